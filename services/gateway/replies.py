"""What the gateway sends back, built without I/O: responses, error replies, dead letters.

A request that could not even be decoded has no envelope to answer with `child()`, so its
error reply salvages what it can (sender, conversation, trace) from the raw JSON and the
`traceparent` header, so the caller's logs and traces still line up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from beamline import bus
from beamline.envelope import (
    DeadLetterPayload,
    Envelope,
    ErrorPayload,
    LLMRequestPayload,
    LLMResponsePayload,
)
from beamline.errors import Reason
from services.gateway.providers import Completion

SENDER = "gateway"
UNKNOWN = "unknown"
DLQ_ORIGINAL_MAX = 4096


@dataclass(frozen=True)
class Reply:
    """Bytes and headers ready for the wire; the bytes are also what the KV store keeps."""

    envelope: Envelope
    data: bytes
    headers: dict[str, str]

    @classmethod
    def of(cls, env: Envelope) -> Reply:
        return cls(env, bus.encode(env), bus.headers_for(env))

    @classmethod
    def stored(cls, data: bytes) -> Reply:
        """A reply kept in the KV store, sent again byte for byte."""
        env = Envelope.model_validate_json(data)
        return cls(env, data, bus.headers_for(env))

    @property
    def ok(self) -> bool:
        return isinstance(self.envelope.payload, LLMResponsePayload)


def response(
    request: Envelope,
    payload: LLMRequestPayload,
    completion: Completion,
    latency_ms: float,
    attempts: int,
) -> Envelope:
    return request.child(
        LLMResponsePayload(
            request_id=request.id,
            provider=payload.provider,
            model=completion.model,
            message=completion.message,
            finish_reason=completion.finish_reason,
            latency_ms=latency_ms,
            attempts=attempts,
        ),
        sender=SENDER,
        recipient=request.sender,
        usage=completion.usage,
    )


def error(
    request: Envelope | None,
    reason: Reason,
    message: str,
    raw: bytes = b"",
    traceparent: str | None = None,
) -> Envelope:
    payload = ErrorPayload(reason=reason.value, message=message)
    if request is not None:
        return request.child(payload, sender=SENDER, recipient=request.sender)
    return orphan(payload, raw, traceparent)


def dead_letter(
    request: Envelope | None,
    reason: Reason,
    detail: str,
    subject: str,
    raw: bytes,
    traceparent: str | None = None,
) -> Envelope:
    payload = DeadLetterPayload(
        reason=reason.value,
        detail=detail,
        subject=subject,
        original=raw[:DLQ_ORIGINAL_MAX].decode(errors="replace"),
        original_bytes=len(raw),
    )
    if request is not None:
        return request.child(payload, sender=SENDER, recipient="dlq")
    return orphan(payload, raw, traceparent, recipient="dlq")


def orphan(
    payload: ErrorPayload | DeadLetterPayload,
    raw: bytes,
    traceparent: str | None,
    recipient: str | None = None,
) -> Envelope:
    """An envelope answering bytes that are not a valid envelope."""
    fields = _salvage(raw)
    trace = bus.parse_traceparent(traceparent)
    if trace is not None:
        fields["trace_id"], fields["parent_span_id"] = trace
    caller = fields.pop("sender", UNKNOWN)
    base: dict[str, Any] = {
        "sender": SENDER,
        "recipient": recipient or caller,
        "conversation_id": fields.pop("conversation_id", UNKNOWN),
        "payload": payload,
    }
    try:
        return Envelope(**base, **fields)
    except ValidationError:  # salvaged ids that do not fit the envelope's patterns
        return Envelope(**base)


def _salvage(raw: bytes) -> dict[str, Any]:
    if len(raw) > 1024 * 1024:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(data, dict):
        return {}
    keep = ("sender", "conversation_id", "trace_id")
    return {k: data[k] for k in keep if isinstance(data.get(k), str) and data[k]}
