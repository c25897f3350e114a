"""The JetStream layout, declared once and applied idempotently (`beamline up`, tests, init).

Mailboxes: one stream for every agent. Inbox subjects `bl.agent.<id>.inbox` are rewritten by
the server into `bl.mbox.<shard>.<id>` (a hash partition of the agent id), and a host holds
one durable consumer per shard instead of one per agent: 32 consumers serve 100,000 agents,
where per-agent consumers would cost ~48 KB and ~4 ms each and minutes of server shutdown.
Per-agent order holds because a shard is consumed by one host, in stream order, and each
agent works through its own queue one message at a time.

Replicas: the init job (`beamline init`) declares the layout with BEAMLINE_STREAM_REPLICAS
(3 on a 3-node cluster). The services still call `ensure_streams` at start without a replica
count, and then an existing stream or bucket keeps the replicas it has: a service never
scales the layout down (nats-server reads an update without replicas as R1).
"""

from __future__ import annotations

import logging
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
from beamline.nats_auth import kv_stream

log = logging.getLogger("beamline.streams")

DAY = 24 * 3600
# A stream accepts up to the server's payload limit; the application limit
# (BEAMLINE_MAX_MESSAGE_BYTES) is enforced by consumers, which dead-letter what is larger
# with a reason rather than letting the publisher's message vanish.
STREAM_MAX_MSG = 1024 * 1024
# nats-server 2.15 caps consumers per stream at 1,000 unless a stream sets its own limit.
MAX_CONSUMERS = 4096


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
