"""runbridge producer client: publish triggers, hear their outcome.

    from runbridge_client import Client, Trigger

    with Client("amqp://user:pass@rabbitmq:5672/%2f") as rb:
        # Fire and forget, with publisher confirms: returns the promise id.
        rb.publish(Trigger(job_id=101, job_parameters={"date": "2026-11-30"}))
        # Or wait for the outcome: the resolved value, or `Rejected`.
        value = rb.run(101, {"date": "2026-11-30"}, timeout=3600)

`AsyncClient` (``runbridge_client.aio``, with aio-pika) does the same under
asyncio. `EventConsumer` reads completion events from a durable queue and
hands each one over once, by event id.

A trigger's ``id`` makes it idempotent: publishing the same trigger again
(after a lost confirm, say) starts nothing new. ``run`` waits on a reply
queue of its own that outlives a dropped connection, so a broker restart
during the wait loses nothing.
"""

from .client import Client, RunTimeout
from .events import EventConsumer, Seen
from .models import Event, EventData, Rejected, Trigger

__all__ = [
    "Client",
    "Event",
    "EventConsumer",
    "EventData",
    "Rejected",
    "RunTimeout",
    "Seen",
    "Trigger",
]
