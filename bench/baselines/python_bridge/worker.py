"""The trigger side of a hand-written bridge, as a team writes it in an
afternoon: consume a trigger, create the promise (SET NX), call run-now,
record the run id, ack. One message at a time, one process.

Configured by environment variables (see bench/baselines/README.md).
"""

import hashlib
import json
import logging
import os

import pika
import redis
import requests

AMQP_URL = os.environ["BRIDGE_AMQP_URL"]
QUEUE = os.environ["BRIDGE_TRIGGERS_QUEUE"]
REDIS_URL = os.environ["BRIDGE_REDIS_URL"]
PREFIX = os.environ["BRIDGE_KEY_PREFIX"]
DATABRICKS_HOST = os.environ["DATABRICKS_HOST"].rstrip("/")
DATABRICKS_TOKEN = os.environ["DATABRICKS_TOKEN"]
CALLBACK_URL = os.environ["BRIDGE_CALLBACK_URL"]
PREFETCH = int(os.environ.get("BRIDGE_PREFETCH", "256"))

log = logging.getLogger("bridge.worker")
r = redis.Redis.from_url(REDIS_URL)
http = requests.Session()
http.headers["Authorization"] = f"Bearer {DATABRICKS_TOKEN}"


def handle(channel, method, properties, body):
    try:
        trigger = json.loads(body)
        promise_id = trigger["id"]
        job_id = int(trigger["job_id"])
    except (ValueError, KeyError, TypeError):
        log.error("bad trigger, dropped: %r", body[:200])
        channel.basic_nack(method.delivery_tag, requeue=False)
        return
    key = f"{PREFIX}:promise:{promise_id}"
    # Created once; a redelivered trigger finds it and launches again with
    # the same idempotency token, so Databricks starts one run.
    r.set(key, "PENDING", nx=True)
    token = hashlib.sha256(promise_id.encode()).hexdigest()[:64]
    try:
        resp = http.post(
            f"{DATABRICKS_HOST}/api/2.2/jobs/run-now",
            json={
                "job_id": job_id,
                "idempotency_token": token,
                "job_parameters": {"promise_id": promise_id, "url": CALLBACK_URL},
            },
            timeout=30,
        )
        resp.raise_for_status()
        run_id = resp.json()["run_id"]
    except requests.RequestException as e:
        log.warning("run-now failed for %s, requeued: %s", promise_id, e)
        channel.basic_nack(method.delivery_tag, requeue=True)
        return
    r.hset(f"{PREFIX}:runs", promise_id, run_id)
    channel.basic_ack(method.delivery_tag)


def main():
    logging.basicConfig(level=logging.WARNING)
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = conn.channel()
    channel.basic_qos(prefetch_count=PREFETCH)
    channel.basic_consume(QUEUE, handle)
    try:
        channel.start_consuming()
    except KeyboardInterrupt:
        channel.stop_consuming()
    conn.close()


if __name__ == "__main__":
    main()
