"""The one-shot init job, `beamline init` (the compose service `init`): declare the JetStream
layout, then apply the ClickHouse schema, then exit 0.

The layout is every stream and key-value bucket of `beamline.streams`, each with
BEAMLINE_STREAM_REPLICAS replicas (3 on a 3-node cluster), declared as the NATS user the
environment names (the `init` user in docker-compose, whose rights are exactly that:
`nats_auth.LAYOUT`). The schema step is `beamline db migrate`. Both are idempotent, so the
job can run at every `docker compose up`; a second run changes nothing.

A failure names its step, the server and the user, and the job exits non-zero, so the
services that wait for it (`service_completed_successfully`) do not start. JetStream may
still be electing its leaders when a cluster has just started, so the layout step retries
what the server calls temporary (503s, timeouts) with capped exponential backoff until its
deadline; a refusal (credentials, permissions) fails at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.client import JetStreamContext
from nats.js.errors import ServiceUnavailableError

from beamline import bus, nats_credentials, streams
from beamline.errors import Reason, TransientError
from beamline.nats_auth import kv_stream
from beamline.settings import MeshSettings

DEFAULT_GIVE_UP_S = 30.0
BACKOFF_S = 0.25
BACKOFF_CAP_S = 4.0
# what JetStream answers while it is not ready yet: worth another try before the deadline
_TEMPORARY = (ServiceUnavailableError, NatsTimeoutError, TimeoutError)


@dataclass(frozen=True)
class Declared:
    """A stream or bucket as the server holds it after the job."""

    kind: str  # "stream" or "bucket"
    name: str
    replicas: int


def backoff_s(attempt: int) -> float:
    """Seconds before retry `attempt` (1, 2, ...): doubling from 0.25 s to 4 s, jittered
    in the upper half."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_S * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


async def declare_layout(
    settings: MeshSettings, give_up_s: float = DEFAULT_GIVE_UP_S
) -> list[Declared]:
    """Declare every stream and bucket with `settings.stream_replicas` replicas; return them
    as the server now holds them. Raises TransientError naming what failed."""
    where = nats_credentials.without_credentials(settings.nats_url)
    operator = nats_credentials.embedded_admin(settings)  # `beamline up`'s mesh, if that
    _, who = nats_credentials.resolve(settings.nats_url, operator)
    user = who.user if who else None
    deadline = time.monotonic() + give_up_s
    nc = await bus.connect(settings.nats_url, "beamline-init", operator, give_up_s)
    try:
        js = nc.jetstream()

        async def declare() -> None:
            await streams.ensure_streams(js, settings.mailbox_shards, settings.stream_replicas)

        try:
            await _retrying(declare, nc, deadline)
            return await _held(js, settings.mailbox_shards)
        except Exception as exc:
            raise TransientError(
                f"declaring the JetStream layout on {where} as user {user!r} with "
                f"{settings.stream_replicas} replica(s) failed: {_why(exc, nc)}",
                Reason.NATS_UNAVAILABLE,
            ) from exc
    finally:
        await nc.close()


async def _retrying(step: Callable[[], Awaitable[None]], nc: NATS, deadline: float) -> None:
    attempt = 0
    while True:
        try:
            await step()
            return
        except _TEMPORARY:
            attempt += 1
            delay = backoff_s(attempt)
            if _denied(nc) or time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)


async def _held(js: JetStreamContext, shards: int) -> list[Declared]:
    found = []
    for config in streams.stream_configs(shards):
        info = await js.stream_info(str(config.name))
        found.append(Declared("stream", str(config.name), info.config.num_replicas or 1))
    for bucket in streams.bucket_configs():
        info = await js.stream_info(kv_stream(bucket.bucket))
        found.append(Declared("bucket", bucket.bucket, info.config.num_replicas or 1))
    return found


def _denied(nc: NATS) -> bool:
    return "permissions violation" in str(nc.last_error or "").lower()


def _why(exc: Exception, nc: NATS) -> str:
    """The server's own refusal when there was one (a denied request just times out)."""
    if _denied(nc):
        return f"{nc.last_error} (the user lacks that grant: shared/beamline/nats_auth.py)"
    if isinstance(exc, NatsTimeoutError | TimeoutError):
        return "JetStream did not answer in time (is JetStream enabled, with enough servers?)"
    return str(exc) or type(exc).__name__
