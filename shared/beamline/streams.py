"""The JetStream layout, declared once and applied idempotently (`beamline init`, `beamline
up`, tests), and checked by each service at start (`require_layout`).

Mailboxes: one stream for every agent. Inbox subjects `bl.agent.<id>.inbox` are rewritten by
the server into `bl.mbox.<shard>.<id>` (a hash partition of the agent id), and a host holds
one durable consumer per shard instead of one per agent: 32 consumers serve 100,000 agents,
where per-agent consumers would cost ~48 KB and ~4 ms each and minutes of server shutdown.
Per-agent order holds because a shard is consumed by one host, in stream order, and each
agent works through its own queue one message at a time.

Replicas: the init job (`beamline init`) declares the layout with BEAMLINE_STREAM_REPLICAS
(3 on a 3-node cluster). `ensure_streams` without a replica count (the embedded `beamline
up`) leaves an existing stream or bucket the replicas it has: it never scales the layout down
(nats-server reads an update without replicas as R1).

Who declares: only the `init` and `admin` NATS users may (`nats_auth.LAYOUT`). A service
checks at start that the streams and buckets it uses exist (`require_layout`, with the
lookups `nats_auth.USES` grants it), waiting a bounded time for an init job that runs
alongside it, and then exits with a ConfigError naming what is missing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import timedelta

from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

from beamline import subjects
from beamline.errors import ConfigError
from beamline.nats_auth import Uses, kv_stream

log = logging.getLogger("beamline.streams")

DAY = 24 * 3600
# A stream accepts up to the server's payload limit; the application limit
# (BEAMLINE_MAX_MESSAGE_BYTES) is enforced by consumers, which dead-letter what is larger
# with a reason rather than letting the publisher's message vanish.
STREAM_MAX_MSG = 1024 * 1024
# nats-server 2.15 caps consumers per stream at 1,000 unless a stream sets its own limit.
MAX_CONSUMERS = 4096
# require_layout: checks while the init job may still be declaring, doubling to a cap
LAYOUT_RETRY_S = 0.25
LAYOUT_RETRY_CAP_S = 4.0
# one check's lookups: JetStream answers in milliseconds, or is not ready yet
LAYOUT_LOOKUP_S = 2.0


def stream_configs(shards: int) -> list[StreamConfig]:
    def cfg(name: str, subjects_: list[str], days: int, **kw: object) -> StreamConfig:
        return StreamConfig(
            name=name,
            subjects=subjects_,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=days * DAY,
            max_msg_size=STREAM_MAX_MSG,
            max_consumers=MAX_CONSUMERS,
            duplicate_window=120,
            allow_direct=True,
            **kw,  # type: ignore[arg-type]
        )

    return [
        cfg(subjects.STREAM_TASKS, [subjects.TASKS_ALL], 7),
        cfg(
            subjects.STREAM_MAILBOX,
            [subjects.INBOX_ALL],
            7,
            subject_transform=SubjectTransform(
                src=subjects.INBOX_ALL, dest=subjects.mailbox_transform_dest(shards)
            ),
        ),
        cfg(subjects.STREAM_JOURNAL, [subjects.JOURNAL_ALL], 30),
        cfg(subjects.STREAM_REPLIES, [subjects.REPLIES_ALL], 7),
        cfg(subjects.STREAM_EVENTS, [subjects.EVENTS_ALL], 7),
        cfg(subjects.STREAM_DLQ, [subjects.DLQ_ALL], 30),
        cfg(subjects.STREAM_ESCALATIONS, [subjects.ESCALATIONS_ALL], 30),
    ]


async def ensure_streams(js: JetStreamContext, shards: int, replicas: int | None = None) -> None:
    """Create every stream and bucket, or bring an existing stream to the declared config.

    `replicas` sets each stream's and bucket's replica count; None keeps an existing one's
    and creates a missing one with R1.
    """
    for config in stream_configs(shards):
        try:
            info = await js.stream_info(config.name)  # type: ignore[arg-type]
        except NotFoundError:
            await js.add_stream(config.evolve(num_replicas=replicas or 1))
            log.info("stream created", extra={"stream": config.name, "replicas": replicas or 1})
            continue
        try:
            await js.update_stream(config.evolve(num_replicas=replicas or info.config.num_replicas))
        except BadRequestError as exc:
            # e.g. a shard count change: the transform cannot be edited under live consumers
            log.warning(
                "stream kept with its existing config",
                extra={"stream": config.name, "error": str(exc)},
            )
    for bucket in bucket_configs():
        await _ensure_bucket(js, bucket, replicas)


def bucket_configs() -> list[KeyValueConfig]:
    return [
        KeyValueConfig(bucket=subjects.BUCKET_LLM_RESULTS, ttl=timedelta(hours=1).total_seconds()),
        KeyValueConfig(bucket=subjects.BUCKET_ATTEMPTS, ttl=timedelta(days=1).total_seconds()),
        # the supervisor's lease and recorded tree state: small, latest value per key only
        KeyValueConfig(bucket=subjects.BUCKET_SUPERVISOR, history=1),
        # the budget ledger: one key, replaced by compare-and-set on every change
        KeyValueConfig(bucket=subjects.BUCKET_BUDGET, history=1),
        # each provider's breaker state, latest only: a host that starts or reconnects reads
        # the current state instead of having to have seen every transition event
        KeyValueConfig(bucket=subjects.BUCKET_BREAKERS, history=1),
        # the loop guard's state: one key, replaced by compare-and-set on every change
        KeyValueConfig(bucket=subjects.BUCKET_LOOPGUARD, history=1),
    ]


async def _ensure_bucket(
    js: JetStreamContext, bucket: KeyValueConfig, replicas: int | None
) -> None:
    """Create a bucket; an existing one changes only its replica count, when one is given.
    (nats-py's create_key_value re-sends the create, which the server refuses once the
    replicas differ, so a service would crash on a bucket the init job made R3.)"""
    try:
        info = await js.stream_info(kv_stream(bucket.bucket))
    except NotFoundError:
        await js.create_key_value(bucket.evolve(replicas=replicas or 1))
        log.info("bucket created", extra={"bucket": bucket.bucket, "replicas": replicas or 1})
        return
    if replicas and info.config.num_replicas != replicas:
        await js.update_stream(info.config.evolve(num_replicas=replicas))
        log.info("bucket replicas changed", extra={"bucket": bucket.bucket, "replicas": replicas})


# --- what a service checks at start ----------------------------------------------------


async def require_layout(js: JetStreamContext, uses: Uses, wait_s: float) -> None:
    """Return once every stream and bucket in `uses` exists on the server; after `wait_s`
    seconds without them, raise ConfigError naming what is missing and how to declare it.

    A service does not declare the layout (its NATS user may not): the init job does, and
    compose starts it first, but a slow init, a JetStream still electing its leaders or a
    hand-started service must not be fatal at once. Lookups that fail otherwise (timeouts,
    503s) count as missing until the deadline, and the error then says why.
    """
    deadline = time.monotonic() + wait_s
    attempt = 0
    while True:
        missing = await missing_layout(js, uses)
        if not missing:
            return
        attempt += 1
        delay = min(layout_retry_s(attempt), deadline - time.monotonic())
        if delay <= 0:
            raise ConfigError(layout_missing_message(missing, wait_s))
        log.warning(
            "waiting for the JetStream layout that `beamline init` declares",
            extra={
                "missing": ", ".join(missing),
                "attempt": attempt,
                "retry_in_s": round(delay, 2),
            },
        )
        await asyncio.sleep(delay)


async def missing_layout(js: JetStreamContext, uses: Uses) -> dict[str, str]:
    """What of `uses` the server does not hold: {"stream BL_TASKS": "not found", ...}."""
    wanted = {
        **{f"stream {s}": s for s in uses.streams},
        **{f"bucket {b}": kv_stream(b) for b in uses.buckets},
    }
    found = await asyncio.gather(
        *(asyncio.wait_for(js.stream_info(name), LAYOUT_LOOKUP_S) for name in wanted.values()),
        return_exceptions=True,
    )
    return {
        what: _why_missing(result)
        for what, result in zip(wanted, found, strict=True)
        if isinstance(result, BaseException)
    }


def _why_missing(exc: BaseException) -> str:
    if isinstance(exc, NotFoundError):
        return "not found"
    if isinstance(exc, TimeoutError):  # nats-py's TimeoutError subclasses it
        return "JetStream did not answer: is it enabled and up?"
    return str(exc) or type(exc).__name__


def layout_retry_s(attempt: int) -> float:
    """Seconds before check `attempt` + 1: doubling from 0.25 s to 4 s, jittered in the
    upper half so services started together do not ask together."""
    ceiling = min(LAYOUT_RETRY_CAP_S, LAYOUT_RETRY_S * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def layout_missing_message(missing: dict[str, str], wait_s: float) -> str:
    if set(missing.values()) == {"not found"}:
        what = f"{', '.join(missing)} not found after waiting {wait_s:g} s"
    else:
        reasons = ", ".join(f"{name} ({why})" for name, why in missing.items())
        what = f"after waiting {wait_s:g} s, still missing: {reasons}"
    return (
        f"the JetStream layout is not declared: {what}. Run `beamline init` against this NATS "
        "server (as the NATS user `init` or `admin`) to declare the streams and buckets; "
        "`make up` runs it as the compose job `init`"
    )
