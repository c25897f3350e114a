"""The thin NATS layer: connect, encode/decode envelopes with their headers, publish."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import Any

import nats
from nats.aio.client import DEFAULT_INBOX_PREFIX
from nats.aio.client import Client as NATS
from nats.errors import AuthorizationError
from nats.js.api import PubAck
from nats.js.client import JetStreamContext
from pydantic import ValidationError

from beamline import nats_auth, nats_credentials, subjects
from beamline.envelope import Envelope
from beamline.errors import CallerError, Reason, TransientError

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


# A refused login is retried with capped exponential backoff: credentials are often fixed
# (or the server's users reloaded) without restarting the service, but retrying at once
# would only flood both logs.
REFUSED_BACKOFF_S = 0.5
REFUSED_BACKOFF_CAP_S = 30.0


def refused_delay(refusals: int) -> float:
    """Seconds before the next login after `refusals` refusals in a row: doubling from
    0.5 s to 30 s, with jitter in the upper half so a delay is never shorter than the last."""
    ceiling = min(REFUSED_BACKOFF_CAP_S, REFUSED_BACKOFF_S * 2 ** (refusals - 1))
    return random.uniform(ceiling / 2, ceiling)


def _refused(exc: Exception) -> bool:
    # nats-py reports a refusal while connecting as a plain Error with the server's text
    return isinstance(exc, AuthorizationError) or ("authorization violation" in str(exc).lower())


def _refusal(where: str, user: str | None) -> str:
    if user is None:
        return (
            f"NATS at {where} refused a connection without credentials: set "
            "BEAMLINE_NATS_USER and BEAMLINE_NATS_PASSWORD (for `beamline up`: the admin "
            f"entry of DATA_DIR/{nats_auth.CREDENTIALS_FILE})"
        )
    return (
        f"NATS at {where} refused user {user!r}: check that BEAMLINE_NATS_PASSWORD is that "
        f"user's password ({nats_auth.password_env(user)} in docker-compose, "
        f"DATA_DIR/{nats_auth.CREDENTIALS_FILE} for `beamline up`) and that the server "
        "has that user"
    )


async def connect(
    url: str,
    name: str,
    credentials: nats_credentials.Credentials | None = None,
    give_up_s: float | None = None,
) -> NATS:
    """Connect and keep reconnecting forever: a restarted NATS server is a pause, not a crash.

    Who connects: `credentials`, else the user in the URL, else BEAMLINE_NATS_USER and
    BEAMLINE_NATS_PASSWORD; the user's inbox prefix keeps its replies readable to it alone
    (`beamline.nats_auth`). A refused login is logged naming the user and retried with
    backoff. With `give_up_s` (a CLI command), raise TransientError at the first refusal,
    or when nothing answered within `give_up_s`.
    """
    servers, who = nats_credentials.resolve(url, credentials)
    user = who.user if who else None
    where = ", ".join(servers)
    refusals = 0
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        nonlocal refusals
        if not _refused(exc):
            log.warning("nats error", extra={"service": name, "error": repr(exc)})
            return
        refusals += 1
        refused.set()
        if give_up_s is not None:
            return  # the caller gives up and says why
        delay = refused_delay(refusals)
        log.error(
            f"{_refusal(where, user)}; retrying in {delay:.1f}s",
            extra={"service": name, "nats_user": user, "refusals": refusals, "retry_in_s": delay},
        )
        # nats-py awaits this callback before its next attempt, so this wait is the backoff
        await asyncio.sleep(delay)

    client: list[NATS] = []  # filled once connected; a deliberate close is not an outage

    async def on_disconnect() -> None:
        if client and (client[0].is_closed or client[0].is_draining):
            return
        log.warning("nats disconnected; reconnecting", extra={"service": name})

    async def on_reconnect() -> None:
        nonlocal refusals
        refusals = 0
        log.info("nats reconnected", extra={"service": name})

    connecting = asyncio.ensure_future(
        nats.connect(
            servers=servers,
            name=name,
            user=user,
            password=who.password.get_secret_value() if who else None,
            inbox_prefix=nats_auth.inbox_prefix(user) if user else DEFAULT_INBOX_PREFIX,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            allow_reconnect=True,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
    )
    if give_up_s is not None:
        await _settle(connecting, refused, give_up_s, where, user)
    nc = await connecting
    refusals = 0
    client.append(nc)
    return nc


async def _settle(
    connecting: asyncio.Future[NATS],
    refused: asyncio.Event,
    give_up_s: float,
    where: str,
    user: str | None,
) -> None:
    """Wait for `connecting`; stop it and raise TransientError at the first refusal (the
    credentials will not change while a command waits) or after `give_up_s`."""
    refusal = asyncio.ensure_future(refused.wait())
    either: list[asyncio.Future[Any]] = [connecting, refusal]
    try:
        await asyncio.wait(either, timeout=give_up_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        refusal.cancel()
    if connecting.done():
        return
    connecting.cancel()
    await asyncio.wait({connecting})  # let the client close its socket
    if refused.is_set():
        raise TransientError(_refusal(where, user), Reason.NATS_UNAVAILABLE)
    raise TransientError(
        f"NATS at {where} does not answer within {give_up_s:g} s: is it running (`beamline up`)?",
        Reason.NATS_UNAVAILABLE,
    )


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


async def drain(nc: NATS, timeout: float = 5.0) -> None:
    """Flush what is pending and close; when NATS is unreachable at shutdown, just close:
    nothing is left that could be flushed."""
    try:
        await asyncio.wait_for(nc.drain(), timeout=timeout)
    except Exception:
        await nc.close()
