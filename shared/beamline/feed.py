"""A stream read in order from a position its service keeps: a durable pull consumer
without acknowledgements (the loop guard's journal, the budget's call events).

Why no acknowledgements: acking every message was most of what the guards still cost the
mesh (issue 4's bench: acking three journal entries per task took about a quarter of its
throughput). The service keeps its own position instead, the last message it finished
with (the loop guard in a KV key on a timer, the budget in its ledger), and the consumer,
which only knows what it delivered, is made again from the message after the position
whenever it may be ahead of it:
- at start, when what it delivered is not the position (a crash with a batch in hand);
- on a gap in its delivery count (a pull's answer lost on the way);
- after a failed pull (NATS restarting), unless its count shows that nothing was lost.

So messages may be handed over again, never skipped: each service makes a second handling
harmless (the loop guard by its persisted decisions, the budget by `applied_seq`). Messages
at or below the position are dropped here. A handler that raises (KV or NATS unavailable
for now) gets the same messages again, in place, so their order holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, SequenceInfo
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from beamline.backoff import backoff

log = logging.getLogger("beamline.feed")

Handle = Callable[[list[Msg]], Awaitable[None]]
RESUME_CAP_S = 10.0  # longest wait between attempts to resume the consumer
FETCH_TIMEOUT_S = 1.0  # an idle fetch returns this often


class Reopen(Exception):
    """The consumer may have delivered messages that were never handled."""


class Feed:
    """`consumer` on `stream`, for messages on `filter_subject`; `what` names them in logs
    and errors, `failed` is told each error (the service's last error)."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        stream: str,
        consumer: str,
        filter_subject: str,
        what: str,
        batch: int,
        linger_s: float,
        retry_s: float,
        failed: Callable[[str], None],
    ) -> None:
        self.js, self.stream, self.consumer, self.filter = js, stream, consumer, filter_subject
        self.what, self.batch, self.linger_s, self.retry_s = what, batch, linger_s, retry_s
        self.failed = failed
        self.seq = 0  # the last message handled: the position
        self.reopened = 0  # times the consumer was made again from the position
        self._delivered = 0  # the consumer's delivery count so far, to see a gap in it
        self._sub: Any = None  # a PullSubscription, bound to the consumer

    async def open(self, position: int | None) -> None:
        """Have the consumer resume right after `position`. None: none was kept yet, so go
        on from where a consumer of that name stands (an older, acknowledged one: its ack
        floor), else from the stream's end, not from a week of history. Before the service
        says it is up: a message published after that is never missed."""
        end = (await self.js.stream_info(self.stream)).state.last_seq
        if position is None:
            info = await self._info()
            if info is None:
                position = end
            elif info.config.ack_policy == AckPolicy.NONE:
                position = _seqs(info.delivered).stream_seq
            else:
                position = _seqs(info.ack_floor).stream_seq
        if position > end:  # else nothing is read until the stream gets back there
            log.warning(
                f"{self.consumer}: position past the end of {self.stream} (was it made "
                "again?); reading on from its end",
                extra={"position": position, "end": end},
            )
            position = end
        self.seq = position
        self._sub = await self._resume()

    def done(self, msg: Msg) -> None:
        """`msg` is handled: a handler that fails later in its batch is not given it again."""
        self.seq = max(self.seq, msg.metadata.sequence.stream)

    async def run(self, handle: Handle) -> None:
        """Hand each batch after the position to `handle`, in order, until it returns; for
        as long as the service runs."""
        while True:
            if self._sub is None:
                self._sub = await self._resume_until_done()
            try:
                await self._pull(self._sub, handle)
            except Reopen as why:
                self.reopened += 1
                log.warning(
                    f"{self.consumer} consumer resumed from the position",
                    extra={"position": self.seq, "why": str(why)},
                )
            finally:
                self._sub = None

    async def _pull(self, sub: Any, handle: Handle) -> None:
        """Fetch and hand over batches until something says the consumer may be ahead of
        the position (Reopen). After a batch that was not full, wait `linger_s` for more to
        gather: a fetch returns as soon as one message is there, and under a steady trickle
        every batch would be one message, each costing a fetch, a write and a wake-up. The
        subscription is closed on the way out: one left open with a fetch outstanding holds
        the connection's drain() for its whole timeout."""
        try:
            while True:
                try:
                    msgs = await sub.fetch(self.batch, timeout=FETCH_TIMEOUT_S)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue  # idle: cancellation is never held up long
                except Exception as exc:  # NATS restarting: deliveries may have been lost
                    self.failed(f"fetching {self.what}: {exc!r}")
                    raise Reopen(f"fetching {self.what}: {exc!r}") from exc
                await self._batch(handle, msgs)
                if self.linger_s and len(msgs) < self.batch:
                    await asyncio.sleep(self.linger_s)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # --- in order, once --------------------------------------------------------------------

    async def _batch(self, handle: Handle, msgs: list[Msg]) -> None:
        for msg in msgs:
            count = msg.metadata.sequence.consumer
            if count > self._delivered + 1:
                raise Reopen(f"deliveries {self._delivered + 1}..{count - 1} never arrived")
            self._delivered = count  # lower after NATS lost its own last writes
        while fresh := [m for m in msgs if m.metadata.sequence.stream > self.seq]:
            try:
                await handle(fresh)
            except Exception as exc:  # in place: the order of what follows holds
                self.failed(f"{self.what} from {self.seq + 1} not handled: {exc!r}")
                log.warning(f"{self.what} not handled; retrying", exc_info=True)
                await asyncio.sleep(self.retry_s)
            else:
                self.done(fresh[-1])

    # --- the consumer ------------------------------------------------------------------------

    async def _resume_until_done(self) -> Any:
        for attempt in itertools.count(1):
            try:
                return await self._resume()
            except Exception as exc:  # NATS or JetStream unavailable for now
                self.failed(f"{self.consumer} consumer not resumed: {exc!r}")
                log.warning(
                    f"{self.consumer} consumer not resumed; retrying", extra={"error": repr(exc)}
                )
                await asyncio.sleep(backoff(attempt, self.retry_s, RESUME_CAP_S))
        raise AssertionError("unreachable")

    async def _resume(self) -> Any:
        """A subscription to the consumer, which delivers next the message after the
        position: the consumer as it is when it stands there, else made again from there."""
        info = await self._info()
        if (
            info is None
            or info.config.ack_policy != AckPolicy.NONE  # a str from the server
            or _seqs(info.delivered).stream_seq != self.seq
        ):
            if info is not None:
                await self.js.delete_consumer(self.stream, self.consumer)
            info = await self.js.add_consumer(
                self.stream,
                ConsumerConfig(
                    durable_name=self.consumer,
                    filter_subject=self.filter,
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=self.seq + 1,
                    ack_policy=AckPolicy.NONE,
                ),
            )
        self._delivered = _seqs(info.delivered).consumer_seq
        return await self.js.pull_subscribe_bind(durable=self.consumer, stream=self.stream)

    async def _info(self) -> ConsumerInfo | None:
        try:
            info: ConsumerInfo = await self.js.consumer_info(self.stream, self.consumer)
        except NotFoundError:
            return None
        return info


def _seqs(found: SequenceInfo | None) -> SequenceInfo:
    return found or SequenceInfo(consumer_seq=0, stream_seq=0)
