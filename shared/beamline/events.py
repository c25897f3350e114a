"""A service's events to JetStream (`bl.events.<source>.<name>`), published off its hot path.

`emit` is synchronous and never blocks: the gateway's breaker listener runs inside
pybreaker's synchronous code, a reply must not wait for an event's ack, and a supervisor's
restart must not wait for its record. Events are sent in the order emitted, up to `WINDOW`
of them awaiting their acks at once: awaited one by one, a busy gateway's call events fell
seconds behind, and the budget settles from them (holds piled up meanwhile). Each envelope
id is its Nats-Msg-Id, so a retried publish stays one message.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.js.client import JetStreamContext

from beamline import bus, subjects
from beamline.envelope import Envelope, EventPayload, Kind
from beamline.service import finish_then_cancel

log = logging.getLogger("beamline.events")

RECIPIENT = "events"
MAX_QUEUED = 10_000
PUBLISH_TRIES = 3
WINDOW = 64  # publishes awaiting their ack at once


def event_envelope(
    source: str,
    name: str,
    data: dict[str, Any],
    parent: Envelope | None = None,
    *,
    recipient: str = RECIPIENT,
    conversation_id: str | None = None,
) -> Envelope:
    """An event envelope; caused by `parent` (same conversation and trace) when given."""
    payload = EventPayload(name=name, data=data)
    if parent is not None:
        return parent.child(payload, sender=source, recipient=recipient)
    return Envelope(
        kind=Kind.EVENT,
        sender=source,
        recipient=recipient,
        conversation_id=conversation_id or source,
        payload=payload,
    )


class EventSink:
    def __init__(self, js: JetStreamContext, source: str) -> None:
        self._js, self.source = js, source
        self._queue: asyncio.Queue[Envelope] = asyncio.Queue(MAX_QUEUED)
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.source}-events")

    def emit(self, name: str, data: dict[str, Any], parent: Envelope | None = None) -> None:
        self.emit_envelope(event_envelope(self.source, name, data, parent))

    def emit_envelope(self, env: Envelope) -> None:
        name = getattr(env.payload, "name", "")
        try:
            self._queue.put_nowait(env)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("event dropped: queue full", extra={"event": name})

    async def close(self, timeout: float) -> None:
        """Publish what is queued (up to `timeout` seconds), then stop."""
        await finish_then_cancel(self._task, self._queue.join, timeout)

    async def _run(self) -> None:
        window = asyncio.Semaphore(WINDOW)
        in_flight: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            in_flight.discard(task)
            window.release()
            self._queue.task_done()

        try:
            while True:
                env = await self._queue.get()
                await window.acquire()
                # started in order, each writes its message before it awaits: sent in order
                task = asyncio.create_task(self._publish(env))
                in_flight.add(task)
                task.add_done_callback(done)
        finally:
            for task in in_flight:
                task.cancel()

    async def _publish(self, env: Envelope) -> None:
        name = getattr(env.payload, "name", "")
        for attempt in range(1, PUBLISH_TRIES + 1):
            try:
                await bus.publish(self._js, subjects.event(self.source, name), env)
                self.published += 1
                return
            except Exception as exc:  # NATS reconnecting: an event is not worth a crash
                if attempt == PUBLISH_TRIES:
                    self.dropped += 1
                    log.warning(
                        "event not published; dropped",
                        extra={"event": name, "envelope_id": env.id, "error": repr(exc)},
                    )
                    return
                await asyncio.sleep(0.2 * attempt)
