"""The asyncio client (aio-pika: ``pip install runbridge-client[asyncio]``).

    from runbridge_client.aio import AsyncClient

    async with AsyncClient(url) as rb:
        value = await rb.run(101, {"date": "2026-11-30"}, timeout=3600)

The connection is aio-pika's robust one: after a drop it reconnects and
restores its channel and the reply queue's consumer by itself.
"""

import asyncio
from typing import Any, Dict, Optional

import aio_pika

from .client import RunTimeout, reply_queue, reply_queue_args
from .models import Event, Trigger


class AsyncClient:
    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/%2f",
        triggers_queue: str = "runbridge.triggers",
    ):
        self.url = url
        self.triggers_queue = triggers_queue
        self._conn: Optional[aio_pika.abc.AbstractRobustConnection] = None
        self._ch: Optional[aio_pika.abc.AbstractChannel] = None

    async def __aenter__(self) -> "AsyncClient":
        await self._channel()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        self._conn = self._ch = None

    async def _channel(self) -> aio_pika.abc.AbstractChannel:
        if self._ch is None:
            self._conn = await aio_pika.connect_robust(self.url)
            self._ch = await self._conn.channel(publisher_confirms=True)
        return self._ch

    async def publish(self, trigger: Trigger, reply_to: Optional[str] = None) -> str:
        """Publishes the trigger and returns once the broker confirmed it
        (persistent, mandatory)."""
        ch = await self._channel()
        await ch.default_exchange.publish(
            aio_pika.Message(
                trigger.to_json(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=trigger.id,
                reply_to=reply_to,
                correlation_id=trigger.id if reply_to else None,
            ),
            routing_key=self.triggers_queue,
            mandatory=True,
        )
        return trigger.id

    async def run(
        self,
        job_id: Optional[int] = None,
        parameters: Optional[Dict[str, str]] = None,
        timeout: float = 3600.0,
        trigger: Optional[Trigger] = None,
    ) -> Any:
        """As `Client.run`: the resolved value, or `Rejected`, or
        `RunTimeout` after ``timeout`` seconds."""
        t = trigger or Trigger(job_id=job_id, job_parameters=parameters or {})
        ch = await self._channel()
        reply = await ch.declare_queue(reply_queue(t.id), arguments=reply_queue_args(timeout))
        try:
            async with reply.iterator() as messages:
                await self.publish(t, reply_to=reply.name)

                async def outcome() -> Event:
                    async for message in messages:
                        async with message.process():
                            if message.correlation_id == t.id:
                                return Event.from_json(message.body)
                    raise RuntimeError("the reply queue's consumer ended")

                try:
                    event = await asyncio.wait_for(outcome(), timeout)
                except asyncio.TimeoutError:
                    raise RunTimeout(t.id, timeout) from None
        finally:
            try:
                await reply.delete(if_unused=False, if_empty=False)
            except (aio_pika.exceptions.AMQPError, ConnectionError):
                pass  # x-expires removes it
        return event.outcome()
