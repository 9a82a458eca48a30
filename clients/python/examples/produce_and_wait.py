"""A producer: publish one trigger and wait for its completion event.

    pip install pika
    python produce_and_wait.py 101 '{"date": "2026-11-23"}'

The trigger's ``id`` makes it idempotent (publish it again after a lost
confirm and runbridge starts nothing new); ``reply_to`` + ``correlation_id``
bring the outcome back on a private queue. Environment: ``AMQP_URL``,
``TRIGGERS_QUEUE`` (default ``runbridge.triggers``).
"""

import json
import os
import sys
import uuid

import pika


def main():
    job_id = int(sys.argv[1]) if len(sys.argv) > 1 else 101
    params = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    queue = os.environ.get("TRIGGERS_QUEUE", "runbridge.triggers")

    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    reply = ch.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    ch.confirm_delivery()  # basic_publish raises if the broker refuses it

    promise_id = f"example-{uuid.uuid4().hex[:12]}"
    ch.basic_publish(
        exchange="",
        routing_key=queue,
        mandatory=True,
        body=json.dumps(
            {
                "id": promise_id,
                "job_id": job_id,
                "job_parameters": params,
                "timeout_seconds": 3600,
                "tags": {"source": "produce_and_wait.py"},
            }
        ),
        properties=pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            reply_to=reply,
            correlation_id=promise_id,
        ),
    )
    print(f"published {promise_id}; waiting for its event", flush=True)
    for method, props, body in ch.consume(reply, auto_ack=True, inactivity_timeout=600):
        if method is None:
            sys.exit("no event within 10 minutes")
        if props.correlation_id == promise_id:
            print(json.dumps(json.loads(body), indent=2))
            break
    conn.close()


if __name__ == "__main__":
    main()
