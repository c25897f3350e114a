"""Dead letters: a message a service cannot use goes to `bl.dlq.<origin>` with its reason,
so it is recorded and can be inspected or replayed, and the service keeps running."""

from __future__ import annotations

import logging
from datetime import datetime

from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from beamline import bus, subjects
from beamline.envelope import DeadLetterPayload, Envelope, Kind
from beamline.errors import CallerError, Reason
from beamline.ids import derived_id

log = logging.getLogger("beamline.deadletter")

_KEEP_BYTES = 4096  # enough to see what was sent; the original stays in its own stream


async def dead_letter(
    js: JetStreamContext,
    *,
    origin: str,
    reason: Reason,
    detail: str,
    subject: str,
    data: bytes,
    key: str,
    ts: datetime | None = None,
    trace_id: str | None = None,
) -> Envelope:
    """Publish a dead letter. `key` identifies the bad message (e.g. "<stream>:<seq>") so
    that dead-lettering the same message again is de-duplicated."""
    env_id = derived_id("dlq", key)
    fields: dict[str, object] = {}
    if ts is not None:
        fields["ts"] = ts
    if trace_id is not None:
        fields["trace_id"] = trace_id
    env = Envelope(
        id=env_id,
        kind=Kind.DEAD_LETTER,
        sender=origin,
        recipient="dlq",
        conversation_id=env_id,
        payload=DeadLetterPayload(
            reason=reason.value,
            detail=detail,
            subject=subject,
            original=data[:_KEEP_BYTES].decode("utf-8", errors="replace"),
            original_bytes=len(data),
        ),
        **fields,  # type: ignore[arg-type]
    )
    await bus.publish(js, subjects.dlq(origin), env)
    log.warning(
        "dead-lettered; inspect with `beamline trace` or replay from the DLQ stream",
        extra={"reason": reason.value, "detail": detail, "subject": subject, "envelope_id": env_id},
    )
    return env


async def dead_letter_msg(
    js: JetStreamContext, msg: Msg, *, origin: str, error: CallerError, subject: str | None = None
) -> Envelope:
    """Dead-letter a stored message a service cannot use, then acknowledge it: from here on
    the dead-letter stream keeps it. `subject` overrides where it was published, for streams
    that store messages under a rewritten subject."""
    meta = msg.metadata
    env = await dead_letter(
        js,
        origin=origin,
        reason=error.reason,
        detail=str(error),
        subject=subject or msg.subject,
        data=msg.data,
        key=f"{meta.stream}:{meta.sequence.stream}",
        ts=meta.timestamp,
    )
    await msg.ack()
    return env
