"""The blocking client (pika)."""

import time
from typing import Any, Dict, Optional

import pika
import pika.exceptions

from .models import Event, Trigger


class RunTimeout(TimeoutError):
    """No outcome within the time ``run`` was given. The run goes on: its
    promise settles later (by its own ``timeout_seconds`` at the latest)."""

    def __init__(self, promise_id: str, seconds: float):
        super().__init__(f"no outcome for {promise_id} within {seconds:g} s")
        self.promise_id = promise_id


# Broker failures worth a reconnect (a dropped connection, a restart).
_LOST = (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError, pika.exceptions.StreamLostError)


def reply_queue(promise_id: str) -> str:
    """The queue a ``run`` of this promise waits on."""
    return f"runbridge.reply.{promise_id}"


def reply_queue_args(seconds: float) -> Dict[str, Any]:
    # The broker deletes the reply queue once nobody has used it for this
    # long: after the wait ends, or when this process is gone for good.
    return {"x-expires": int((seconds + 60) * 1000)}


class Client:
    """Publishes triggers to runbridge's trigger queue with publisher
    confirms, and waits for outcomes. One connection; not thread-safe (one
    Client per thread)."""

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/%2f",
        triggers_queue: str = "runbridge.triggers",
        reconnect_seconds: float = 30.0,
    ):
        self.url = url
        self.triggers_queue = triggers_queue
        self.reconnect_seconds = reconnect_seconds
        self._conn: Optional[pika.BlockingConnection] = None
        self._ch = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None and self._conn.is_open:
            try:
                self._conn.close()
            except _LOST:
                pass
        self._conn = self._ch = None

    def _channel(self):
        """The open channel, reconnecting (for up to reconnect_seconds) if
        the connection was lost."""
        if self._ch is not None and self._ch.is_open:
            return self._ch
        self.close()
        deadline = time.monotonic() + self.reconnect_seconds
        pause = 0.2
        while True:
            try:
                self._conn = pika.BlockingConnection(pika.URLParameters(self.url))
                self._ch = self._conn.channel()
                self._ch.confirm_delivery()
                return self._ch
            except pika.exceptions.AMQPConnectionError:
                if time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    def publish(self, trigger: Trigger, reply_to: Optional[str] = None) -> str:
        """Publishes the trigger and returns once the broker confirmed it
        (persistent, mandatory: a missing queue is an error, not a silent
        drop). A connection lost before the confirm is reconnected and the
        trigger published again: its id makes the repeat harmless."""
        props = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=trigger.id,
            reply_to=reply_to,
            correlation_id=trigger.id if reply_to else None,
        )
        try:
            self._publish(trigger, props)
        except _LOST:
            # Lost before the confirm: once more, on a new connection.
            self.close()
            self._publish(trigger, props)
        return trigger.id

    def _publish(self, trigger: Trigger, props: pika.BasicProperties) -> None:
        self._channel().basic_publish(
            exchange="",
            routing_key=self.triggers_queue,
            body=trigger.to_json(),
            properties=props,
            mandatory=True,
        )

    def run(
        self,
        job_id: Optional[int] = None,
        parameters: Optional[Dict[str, str]] = None,
        timeout: float = 3600.0,
        trigger: Optional[Trigger] = None,
    ) -> Any:
        """Publishes a trigger (``job_id`` and job ``parameters``, or a
        ``trigger`` of your own) and waits for its outcome: returns the
        resolved value, raises `Rejected` with the event, or `RunTimeout`
        after ``timeout`` seconds. The outcome comes to a reply queue of
        this run's own, which survives a dropped connection: the wait goes
        on after reconnecting."""
        t = trigger or Trigger(job_id=job_id, job_parameters=parameters or {})
        reply = reply_queue(t.id)
        deadline = time.monotonic() + timeout
        self._channel().queue_declare(queue=reply, arguments=reply_queue_args(timeout))
        self.publish(t, reply_to=reply)
        try:
            while True:
                if time.monotonic() >= deadline:
                    raise RunTimeout(t.id, timeout)
                try:
                    event = self._wait(reply, t.id)
                except _LOST:
                    self.close()  # the next _channel() reconnects
                    continue
                if event is not None:
                    return event.outcome()
        finally:
            try:
                ch = self._channel()
                ch.cancel()
                ch.queue_delete(queue=reply)
            except _LOST:
                pass  # x-expires removes it

    def _wait(self, reply: str, promise_id: str) -> Optional[Event]:
        """The outcome if it arrives within about a second, else None (the
        caller checks its deadline). The consumer stays between calls."""
        ch = self._channel()
        for method, props, body in ch.consume(reply, inactivity_timeout=1.0):
            if method is None:
                return None
            ch.basic_ack(method.delivery_tag)
            if props.correlation_id == promise_id:
                return Event.from_json(body)
        return None
