"""Consuming a durable pull subscription for as long as a service runs: the fetch loop of
`beamline.feed` (the budget service's call events, the loop guard's journal)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.msg import Msg

log = logging.getLogger("beamline.pulling")

FETCH_TIMEOUT_S = 1.0  # an idle fetch returns this often: cancellation is never held up long
RETRY_S = 1.0  # after a failed fetch (NATS reconnecting); the messages wait in the stream


async def pull_forever(
    sub: Any,  # a JetStreamContext.PullSubscription
    batch: int,
    handle: Callable[[list[Msg]], Awaitable[None]],
    what: str,
    failed: Callable[[str], None],
    linger_s: float = 0.0,
) -> None:
    """Fetch up to `batch` messages at a time and `handle` each batch, until cancelled. A
    failed fetch is told to `failed` (the service's last error), logged and retried; what
    `handle` (or `failed`) raises ends the loop. After a batch that was not full, wait `linger_s` for more
    to gather: a fetch returns as soon as one message is there, and under a steady trickle
    every batch would be one message, each costing a fetch, a write and a wake-up. The
    subscription is closed on the way out: one left open with a fetch outstanding holds the
    connection's drain() for its whole timeout."""
    try:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=FETCH_TIMEOUT_S)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except Exception as exc:
                failed(f"fetching {what}: {exc!r}")
                log.warning(f"{what} not fetched; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(RETRY_S)
                continue
            await handle(msgs)
            if linger_s and len(msgs) < batch:
                await asyncio.sleep(linger_s)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
