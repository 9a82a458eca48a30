"""A downstream consumer that processes each completion event once.

    pip install pika
    python consume_events.py 'promise.#'

Events arrive at least once (a relay that crashed between the broker's
confirm and its outbox ack publishes again), always with the same
``message_id`` (``<promise id>/<state>``): deduplicating by it makes the
processing exactly-once. Environment: ``AMQP_URL``, ``EVENTS_EXCHANGE``
(default ``runbridge.events``), ``QUEUE`` (default ``example.events``).
"""

import json
import os
import sys

import pika


def main():
    binding = sys.argv[1] if len(sys.argv) > 1 else "promise.#"
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    exchange = os.environ.get("EVENTS_EXCHANGE", "runbridge.events")
    queue = os.environ.get("QUEUE", "example.events")

    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=32)
    # Durable: events published while this consumer is down wait for it.
    ch.queue_declare(queue=queue, durable=True)
    ch.queue_bind(queue=queue, exchange=exchange, routing_key=binding)
    print(f"consuming {binding} from {exchange} via {queue}", flush=True)

    # In production: a unique key stored with the processing's effects, in
    # the same transaction, not a set in memory.
    seen = set()
    for method, props, body in ch.consume(queue):
        if props.message_id in seen:
            print(f"{props.message_id}: duplicate delivery, skipped", flush=True)
        else:
            seen.add(props.message_id)
            d = json.loads(body)["data"]
            print(f"{props.message_id}: {d['state']} (run {d['run_id']}, settled by {d['settled_by']})", flush=True)
        # Ack after processing: a crash before this redelivers; the id catches it.
        ch.basic_ack(method.delivery_tag)


if __name__ == "__main__":
    main()
