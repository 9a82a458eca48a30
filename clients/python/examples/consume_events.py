"""A downstream consumer that processes each completion event once.

    pip install ./clients/python/producer
    python consume_events.py 'promise.#'

Events arrive at least once (a relay that crashed between the broker's
confirm and its outbox ack publishes again), always with the same id
(``<promise id>/<state>``, also the AMQP ``message_id``).
`EventConsumer` hands each id over once and acks after the handler
returned. Environment: ``AMQP_URL``, ``EVENTS_EXCHANGE`` (default
``runbridge.events``), ``QUEUE`` (default ``example.events``).
"""

import os
import sys

from runbridge_client import Event, EventConsumer


def handle(event: Event) -> None:
    # In production, record the event id with the processing's effects, in
    # the same transaction: the consumer's memory of ids is lost on restart.
    d = event.data
    print(f"{event.id}: {d.state} (run {d.run_id}, settled by {d.settled_by})", flush=True)


def main():
    binding = sys.argv[1] if len(sys.argv) > 1 else "promise.#"
    consumer = EventConsumer(
        os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        queue=os.environ.get("QUEUE", "example.events"),
        binding=binding,
        exchange=os.environ.get("EVENTS_EXCHANGE", "runbridge.events"),
    )
    print(f"consuming {binding} from {consumer.exchange} via {consumer.queue}", flush=True)
    consumer.run(handle)


if __name__ == "__main__":
    main()
