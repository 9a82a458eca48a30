"""A producer: publish one trigger and wait for its completion event.

    pip install pika
    python produce_and_wait.py 101 '{"date": "2026-11-23"}'

Fan-out: run the job once per parameter set and hear one answer, the
values in order (or which child failed; the others are then cancelled)::

    python produce_and_wait.py 101 '{"env": "prod"}' \
        --for-each '[{"date": "2026-11-01"}, {"date": "2026-11-02"}]' \
        --max-concurrency 5

The trigger's ``id`` makes it idempotent (publish it again after a lost
confirm and runbridge starts nothing new); ``reply_to`` + ``correlation_id``
bring the outcome back on a private queue. Environment: ``AMQP_URL``,
``TRIGGERS_QUEUE`` (default ``runbridge.triggers``).
"""

import argparse
import json
import os
import sys
import uuid

import pika


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job_id", type=int, nargs="?", default=101)
    ap.add_argument("params", nargs="?", default="{}", help="job parameters (JSON)")
    ap.add_argument("--for-each", help="a JSON list of parameter sets: one child run each")
    ap.add_argument("--join", choices=["all", "all_settled", "any"], default="all")
    ap.add_argument("--max-concurrency", type=int)
    args = ap.parse_args()
    job_id, params = args.job_id, json.loads(args.params)
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    queue = os.environ.get("TRIGGERS_QUEUE", "runbridge.triggers")

    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    reply = ch.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    ch.confirm_delivery()  # basic_publish raises if the broker refuses it

    promise_id = f"example-{uuid.uuid4().hex[:12]}"
    trigger = {
        "id": promise_id,
        "job_id": job_id,
        "job_parameters": params,
        "timeout_seconds": 3600,
        "tags": {"source": "produce_and_wait.py"},
    }
    if args.for_each:
        # A parent trigger: children <id>/0, <id>/1, ... each run the job
        # with its set laid over the shared parameters.
        trigger["for_each"] = json.loads(args.for_each)
        trigger["join"] = args.join
        if args.max_concurrency:
            trigger["max_concurrency"] = args.max_concurrency
    ch.basic_publish(
        exchange="",
        routing_key=queue,
        mandatory=True,
        body=json.dumps(trigger),
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
