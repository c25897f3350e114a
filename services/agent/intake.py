"""Turning whatever a publisher sent into a task envelope, or a reasoned refusal.

A task needs nothing but NATS: plain text, `{"prompt": ...}` JSON, or a full envelope.
Ids that the publisher did not choose are derived from the message's place in its stream,
so a redelivered message maps to the same envelope and de-duplicates everywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime

from nats.aio.msg import Msg
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from beamline import bus, subjects
from beamline.envelope import Envelope, Kind, TaskPayload
from beamline.errors import CallerError, Reason
from beamline.ids import derived_id, is_token


class TaskRequest(BaseModel):
    """The JSON form of a task: what a user types after `nats pub bl.task.<role>`."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    conversation_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,128}$")
    reply_to: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


def task_from_msg(msg: Msg, *, recipient: str, max_bytes: int) -> Envelope:
    """A task envelope from a stored JetStream message (its place in the stream names it)."""
    meta = msg.metadata
    return to_task(
        msg.data,
        msg.headers,
        recipient=recipient,
        origin=f"{meta.stream}:{meta.sequence.stream}",
        received=meta.timestamp,
        max_bytes=max_bytes,
    )


def to_task(
    data: bytes,
    headers: Mapping[str, str] | None,
    *,
    recipient: str,
    origin: str,
    received: datetime,
    max_bytes: int,
) -> Envelope:
    """A task envelope for `recipient` from a raw message. `origin` ("<stream>:<seq>") and
    `received` (the stream's timestamp) make a redelivery yield the very same envelope."""
    bus.check_size(data, max_bytes)
    headers = headers or {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CallerError("task is neither UTF-8 text nor JSON", Reason.NOT_JSON) from exc
    stripped = text.strip()
    if not stripped:
        raise CallerError('task is empty: send text or {"prompt": ...}', Reason.INVALID_SCHEMA)
    if stripped[0] not in "{[":
        return _envelope(TaskRequest(prompt=stripped), headers, recipient, origin, received)
    try:
        doc = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise CallerError(f"task looks like JSON but is not valid: {exc}", Reason.NOT_JSON) from exc
    if isinstance(doc, dict) and "payload" in doc:
        env = bus.decode(data, max_bytes)
        if not isinstance(env.payload, TaskPayload):
            raise CallerError(
                f"a {env.kind.value} envelope was sent where a task was expected",
                Reason.INVALID_SCHEMA,
            )
        return env  # as sent: an envelope id always names the same content
    try:
        request = TaskRequest.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "task"
        raise CallerError(
            f"task is invalid: {where}: {first['msg']}", Reason.INVALID_SCHEMA
        ) from exc
    return _envelope(request, headers, recipient, origin, received)


def _envelope(
    request: TaskRequest,
    headers: Mapping[str, str],
    recipient: str,
    origin: str,
    received: datetime,
) -> Envelope:
    msg_id = headers.get(subjects.H_MSG_ID, "")
    env_id = msg_id if is_token(msg_id) else derived_id(origin)
    trace = bus.parse_traceparent(headers.get(subjects.H_TRACEPARENT))
    digest = hashlib.sha256(env_id.encode()).hexdigest()
    return Envelope(
        id=env_id,
        kind=Kind.TASK,
        sender="client",
        recipient=recipient,
        conversation_id=request.conversation_id or env_id,
        trace_id=trace[0] if trace else digest[:32],
        parent_span_id=trace[1] if trace else None,
        span_id=digest[32:48],
        ts=received,
        payload=TaskPayload(
            prompt=request.prompt, reply_to=request.reply_to, metadata=request.metadata
        ),
    )
