"""The journal as the loop guard reads it: every entry after the last one it finished with,
in order, each handed over until it is handled.

Why no acknowledgements: acking every entry (three per task) was most of what the guards
still cost the mesh (`guard_overhead_pct` about 25-35 % with acks, a few % without). So the
durable consumer `loopguard` has `AckPolicy.NONE`, and the loop guard keeps its own
position (`store.PositionStore`): the last entry handled, persisted every
`position_flush_s` and at stop. The consumer only knows what it delivered, and is made
again from the entry after the position whenever it may be ahead of it:
- at start, when what it delivered is not the position (a crash with a batch in hand);
- on a gap in its delivery count (a pull's answer lost on the way);
- after a failed pull (NATS restarting), unless its count shows nothing was lost.

So entries may be read again, never skipped. Reading one again is harmless: the entries at
or below the position are dropped, a conversation's counts are rebuilt from the journal,
and a loop's decision is persisted before it is acted on (see `service`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, SequenceInfo
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from beamline import subjects
from beamline.backoff import backoff
from beamline.pulling import pull_forever
from services.loopguard.settings import LoopguardSettings
from services.loopguard.store import JournalPosition, PositionStore

log = logging.getLogger("beamline.loopguard")

Handle = Callable[[Msg], Awaitable[None]]
RESUME_CAP_S = 10.0  # longest wait between attempts to resume the consumer


class Reopen(Exception):
    """The consumer may have delivered entries that were never handled."""


class JournalFeed:
    def __init__(
        self,
        js: JetStreamContext,
        store: PositionStore,
        settings: LoopguardSettings,
        failed: Callable[[str], None],
    ) -> None:
        self.js, self.store, self.settings, self.failed = js, store, settings, failed
        self.seq = 0  # the last entry handled: the position
        self.saved = 0  # the position as persisted
        self.reopened = 0  # times the consumer was made again from the position
        self._delivered = 0  # the consumer's delivery count so far, to see a gap in it
        self._sub: Any = None  # a PullSubscription, bound to the consumer

    async def open(self) -> None:
        """Load the position and have the consumer resume right after it. Before the
        service says it is up: an entry written after that is never unwatched."""
        position = await self.store.load()
        if self.store.revision:
            self.seq = self.saved = position.seq
        else:
            info = await self._info()
            if info is not None:  # an older loop guard's acknowledged consumer: on from there
                self.seq = _seqs(info.ack_floor).stream_seq
            else:  # a first start watches from now on, not a month of finished conversations
                self.seq = (await self.js.stream_info(subjects.STREAM_JOURNAL)).state.last_seq
            await self.save()
        self._sub = await self._resume()

    async def run(self, handle: Handle) -> None:
        """Hand each entry after the position to `handle`, in order, until it returns
        (what it raises: NATS or KV unavailable for now, so the same entry again); forever."""
        while True:
            if self._sub is None:
                self._sub = await self._resume_until_done()
            try:
                await pull_forever(
                    self._sub,
                    self.settings.fetch_batch,
                    partial(self._batch, handle),
                    "journal entries",
                    self._fetch_failed,
                    self.settings.linger_s,
                )
            except Reopen as why:
                self.reopened += 1
                log.warning(
                    "journal consumer resumed from the position",
                    extra={"position": self.seq, "why": str(why)},
                )
            finally:
                self._sub = None

    async def keep(self) -> None:
        """Persist the position every `position_flush_s` when it moved; forever."""
        while True:
            await asyncio.sleep(self.settings.position_flush_s)
            try:
                await self.save()
            except Exception as exc:  # NATS unavailable for now: the next tick tries again
                self.failed(f"journal position not saved: {exc!r}")
                log.warning("journal position not saved; retrying", extra={"error": repr(exc)})

    async def save(self) -> None:
        seq = self.seq
        if seq != self.saved or not self.store.revision:
            await self.store.save_or_exit(JournalPosition(seq=seq))
            self.saved = seq

    # --- in order, once --------------------------------------------------------------------

    async def _batch(self, handle: Handle, msgs: list[Msg]) -> None:
        for msg in msgs:
            sequence = msg.metadata.sequence
            if sequence.consumer > self._delivered + 1:
                raise Reopen(
                    f"deliveries {self._delivered + 1}..{sequence.consumer - 1} never arrived"
                )
            self._delivered = sequence.consumer  # lower after NATS lost its own last writes
            if sequence.stream <= self.seq:
                continue  # handled already (the consumer went back to an older state)
            await self._until_handled(handle, msg, sequence.stream)
            self.seq = sequence.stream

    async def _until_handled(self, handle: Handle, msg: Msg, seq: int) -> None:
        while True:
            try:
                await handle(msg)
                return
            except Exception as exc:  # in place: a conversation's entries count in order
                self.failed(f"journal entry {seq} not handled: {exc!r}")
                log.warning("journal entry not handled; retrying", exc_info=True)
                await asyncio.sleep(self.settings.retry_s)

    def _fetch_failed(self, error: str) -> None:
        self.failed(error)
        raise Reopen(error)  # ends pull_forever: the consumer is checked before pulling on

    # --- the consumer ------------------------------------------------------------------------

    async def _resume_until_done(self) -> Any:
        for attempt in itertools.count(1):
            try:
                return await self._resume()
            except Exception as exc:  # NATS or JetStream unavailable for now
                self.failed(f"journal consumer not resumed: {exc!r}")
                log.warning("journal consumer not resumed; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(backoff(attempt, self.settings.retry_s, RESUME_CAP_S))
        raise AssertionError("unreachable")

    async def _resume(self) -> Any:
        """A subscription to the consumer, which delivers next the entry after the position:
        the consumer as it is when it stands there, else made again from there."""
        info = await self._info()
        if (
            info is None
            or info.config.ack_policy != AckPolicy.NONE  # a str from the server
            or _seqs(info.delivered).stream_seq != self.seq
        ):
            if info is not None:
                await self.js.delete_consumer(subjects.STREAM_JOURNAL, subjects.CONSUMER_LOOPGUARD)
            info = await self.js.add_consumer(
                subjects.STREAM_JOURNAL,
                ConsumerConfig(
                    durable_name=subjects.CONSUMER_LOOPGUARD,
                    filter_subject=subjects.JOURNAL_ALL,
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=self.seq + 1,
                    ack_policy=AckPolicy.NONE,
                ),
            )
        self._delivered = _seqs(info.delivered).consumer_seq
        return await self.js.pull_subscribe_bind(
            durable=subjects.CONSUMER_LOOPGUARD, stream=subjects.STREAM_JOURNAL
        )

    async def _info(self) -> ConsumerInfo | None:
        try:
            info: ConsumerInfo = await self.js.consumer_info(
                subjects.STREAM_JOURNAL, subjects.CONSUMER_LOOPGUARD
            )
        except NotFoundError:
            return None
        return info


def _seqs(found: SequenceInfo | None) -> SequenceInfo:
    return found or SequenceInfo(consumer_seq=0, stream_seq=0)
