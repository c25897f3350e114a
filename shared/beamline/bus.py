"""The thin NATS layer: connect, encode/decode envelopes with their headers, publish."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import nats
from nats.aio.client import Client as NATS
from nats.js.api import PubAck
from nats.js.client import JetStreamContext
from pydantic import ValidationError

from beamline import subjects
from beamline.envelope import Envelope
from beamline.errors import CallerError, Reason

log = logging.getLogger("beamline.bus")


def traceparent(env: Envelope) -> str:
    return f"00-{env.trace_id}-{env.span_id}-01"


def parse_traceparent(value: str | None) -> tuple[str, str] | None:
    """(trace_id, parent span id) from a W3C traceparent header, or None if absent/invalid."""
    if not value:
        return None
    parts = value.strip().split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    trace_id, span_id = parts[1].lower(), parts[2].lower()
    if set(trace_id) <= {"0"} or set(span_id) <= {"0"}:
        return None
    try:
        int(trace_id, 16), int(span_id, 16)
    except ValueError:
        return None
    return trace_id, span_id


def headers_for(env: Envelope) -> dict[str, str]:
    headers = {
        subjects.H_MSG_ID: env.id,
        subjects.H_TRACEPARENT: traceparent(env),
        subjects.H_KIND: env.kind.value,
        subjects.H_SCHEMA: str(env.schema_version),
    }
    reason = getattr(env.payload, "reason", None)
    if reason:
        headers[subjects.H_REASON] = str(reason)
    return headers


def encode(env: Envelope) -> bytes:
    return env.model_dump_json(exclude_none=True).encode()


def check_size(data: bytes, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise CallerError(
            f"message is {len(data)} bytes, over the {max_bytes}-byte limit "
            "(BEAMLINE_MAX_MESSAGE_BYTES); send ids, not documents",
            Reason.OVERSIZED,
        )


def decode(data: bytes, max_bytes: int) -> Envelope:
    """An envelope from wire bytes, or a CallerError naming what is wrong with them."""
    check_size(data, max_bytes)
    try:
        return Envelope.model_validate_json(data)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise CallerError("message is not valid JSON", Reason.NOT_JSON) from exc
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise CallerError(
            f"message is not a valid envelope: {where}: {first['msg']}", Reason.INVALID_SCHEMA
        ) from exc


async def connect(url: str, name: str) -> NATS:
    """Connect and keep reconnecting forever: a restarted NATS server is a pause, not a crash."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", extra={"service": name, "error": repr(exc)})

    client: list[NATS] = []  # filled once connected; a deliberate close is not an outage

    async def on_disconnect() -> None:
        if client and (client[0].is_closed or client[0].is_draining):
            return
        log.warning("nats disconnected; reconnecting", extra={"service": name})

    async def on_reconnect() -> None:
        log.info("nats reconnected", extra={"service": name})

    nc = await nats.connect(
        servers=[u.strip() for u in url.split(",")],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    client.append(nc)
    return nc


async def publish(
    js: JetStreamContext,
    subject: str,
    env: Envelope,
    extra_headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> PubAck:
    """Persist an envelope; its id is the de-duplication key, so re-publishing is safe."""
    headers = headers_for(env)
    if extra_headers:
        headers.update(extra_headers)
    return await js.publish(subject, encode(env), headers=headers, timeout=timeout)
