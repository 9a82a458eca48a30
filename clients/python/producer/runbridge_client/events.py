"""Reading completion events once each.

runbridge publishes every event at least once: after a lost confirm, the
same event (same CloudEvent ``id``) can arrive twice. `EventConsumer` hands
each id over once, as long as it is among the last ``remember`` ids seen.
"""

from collections import OrderedDict
from typing import Callable, Optional

import pika

from .models import Event


class Seen:
    """The last ``remember`` event ids, oldest forgotten first."""

    def __init__(self, remember: int = 100_000):
        self.remember = remember
        self._ids: "OrderedDict[str, None]" = OrderedDict()

    def first_time(self, event_id: str) -> bool:
        """True the first time an id is offered; it is remembered then."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return False
        self._ids[event_id] = None
        if len(self._ids) > self.remember:
            self._ids.popitem(last=False)
        return True


class EventConsumer:
    """A durable queue bound to the events exchange (``binding`` e.g.
    ``promise.#``, ``promise.resolved``), consumed with acknowledgements:
    an event is acked after ``handler`` returned, so one that was being
    handled when the process died comes again; duplicates (by event id)
    are acked without calling the handler."""

    def __init__(
        self,
        url: str,
        queue: str,
        binding: str = "promise.#",
        exchange: str = "runbridge.events",
        seen: Optional[Seen] = None,
        prefetch: int = 64,
        queue_arguments: Optional[dict] = None,
    ):
        self.url, self.queue, self.binding, self.exchange = url, queue, binding, exchange
        self.seen = seen or Seen()
        self.prefetch = prefetch
        # Quorum by default: replicated, and events wait in it while the
        # consumer is down. An existing queue must be declared as it is.
        self.queue_arguments = {"x-queue-type": "quorum"} if queue_arguments is None else queue_arguments

    def run(self, handler: Callable[[Event], None], max_idle: Optional[float] = None) -> int:
        """Consumes until no event came for ``max_idle`` seconds (None:
        forever); returns how many events were handed to ``handler``."""
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        handled = 0
        try:
            ch = conn.channel()
            ch.queue_declare(queue=self.queue, durable=True, arguments=self.queue_arguments)
            ch.queue_bind(queue=self.queue, exchange=self.exchange, routing_key=self.binding)
            ch.basic_qos(prefetch_count=self.prefetch)
            for method, _props, body in ch.consume(self.queue, inactivity_timeout=max_idle):
                if method is None:
                    break
                event = Event.from_json(body)
                if self.seen.first_time(event.id):
                    handler(event)
                    handled += 1
                ch.basic_ack(method.delivery_tag)
        finally:
            if conn.is_open:
                conn.close()
        return handled
