"""`beamline.feed` on a real nats-server (the journal stream, as the loop guard reads it): a
consumer without acknowledgements, resumed from a position its service keeps. Every
message after the position is handled, in order, once its handler succeeds: after a crash
with messages in hand, deliveries lost on the way, a failing handler, the consumer deleted
under it, NATS restarted, or an older acknowledged consumer of the same name. A batch that
was not full is followed by a linger that lets the next one gather."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from beamline import bus, subjects
from beamline.envelope import Envelope, Kind, TaskPayload
from beamline.feed import Feed
from beamline.testing import NatsServer, wait_for

CONSUMER = "feed-test"


async def write(nc: NATS, n: int) -> list[int]:
    """`n` journal entries of one conversation; their stream sequences."""
    js = nc.jetstream()
    return [(await bus.publish(js, subjects.journal("a", "c1"), _entry())).seq for _ in range(n)]


def _entry() -> Envelope:
    return Envelope(
        kind=Kind.TASK, sender="cli", recipient="a", conversation_id="c1",
        payload=TaskPayload(prompt="q"),
    )  # fmt: skip


class Reader:
    """A running feed, with what its handler got through; `slow` runs before each message."""

    def __init__(
        self,
        nc: NATS,
        slow: Callable[[Msg], Awaitable[None]] | None = None,
        linger_s: float = 0,
    ) -> None:
        self.handled: list[int] = []
        self.batches: list[list[int]] = []
        self.errors: list[str] = []
        self._slow = slow
        self._task: asyncio.Task[None] | None = None
        self.feed = Feed(
            nc.jetstream(),
            stream=subjects.STREAM_JOURNAL,
            consumer=CONSUMER,
            filter_subject=subjects.JOURNAL_ALL,
            what="journal entries",
            batch=4,
            linger_s=linger_s,
            retry_s=0.05,
            failed=self.errors.append,
        )

    async def start(self, position: int | None) -> Reader:
        await self.feed.open(position)
        self._task = asyncio.create_task(self.feed.run(self.on_batch))
        return self

    async def on_batch(self, msgs: list[Msg]) -> None:
        self.batches.append([m.metadata.sequence.stream for m in msgs])
        for msg in msgs:
            if self._slow is not None:
                await self._slow(msg)
            self.handled.append(msg.metadata.sequence.stream)
            self.feed.done(msg)

    async def until(self, seqs: list[int]) -> None:
        def done() -> bool:
            return self.handled[-len(seqs) :] == seqs

        await wait_for(done, timeout=15, what=f"entries {seqs} handled; got {self.handled}")

    async def crash(self) -> None:
        """Stopped where it stands, as a killed process is."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def readers() -> AsyncIterator[list[Reader]]:
    started: list[Reader] = []
    try:
        yield started
    finally:
        for reader in started:
            with contextlib.suppress(Exception):
                await reader.crash()


async def start(readers: list[Reader], reader: Reader, position: int | None) -> Reader:
    readers.append(reader)
    return await reader.start(position)


async def thieve(nc: NATS, n: int) -> list[int]:
    """Take `n` deliveries of the consumer elsewhere, as a pull answered into a lost
    connection would: the feed never sees them."""
    thief = await nc.jetstream().pull_subscribe_bind(
        durable=CONSUMER, stream=subjects.STREAM_JOURNAL
    )
    try:
        return [m.metadata.sequence.stream for m in await thief.fetch(n, timeout=5)]
    finally:
        await thief.unsubscribe()


async def test_a_first_start_reads_from_now_and_a_restart_reads_again_after_its_position(
    nc: NATS, readers: list[Reader]
) -> None:
    before = await write(nc, 3)
    first = await start(readers, Reader(nc), None)
    assert first.feed.seq == before[-1]  # from now on, not the stream's history

    seqs = await write(nc, 6)
    await first.until(seqs)
    assert first.handled == seqs  # in order, once
    await first.crash()

    # the service had persisted its position at the second entry: the rest is read again,
    # though the consumer delivered all of it
    second = await start(readers, Reader(nc), seqs[1])
    more = await write(nc, 2)
    await second.until(seqs[2:] + more)
    assert second.handled == seqs[2:] + more

    # none persisted, the consumer exists: on from what it delivered
    await second.crash()
    third = await start(readers, Reader(nc), None)
    assert third.feed.seq == more[-1]

    # a position past the stream's end (the stream made again): on from the end, not
    # waiting for the sequence to get back there
    await third.crash()
    fourth = await start(readers, Reader(nc), more[-1] + 1000)
    assert fourth.feed.seq == more[-1]
    last = await write(nc, 1)
    await fourth.until(last)


async def test_after_a_short_batch_the_feed_lingers_and_the_next_batch_gathers(
    nc: NATS, readers: list[Reader]
) -> None:
    first = await write(nc, 1)
    reader = await start(readers, Reader(nc, linger_s=1.0), first[0] - 1)
    await reader.until(first)
    rest = await write(nc, 3)  # all within the linger after the first batch
    await reader.until(rest)
    assert reader.batches == [first, rest]  # one fetch for the three, not one each
    assert not reader.errors
    # nothing is left for the consumer to deliver, and nothing waits for an ack
    info = await nc.jetstream().consumer_info(subjects.STREAM_JOURNAL, CONSUMER)
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def test_deliveries_lost_on_the_way_are_read_again(nc: NATS, readers: list[Reader]) -> None:
    reader = await start(readers, Reader(nc), None)
    seqs = await write(nc, 2)
    await reader.until(seqs)
    await reader.crash()
    # after a crash, the next start finds the consumer past the position
    stolen = await write(nc, 2)
    assert await thieve(nc, 2) == stolen
    held = asyncio.Event()
    blocked: list[int] = []

    async def slow(msg: Msg) -> None:
        if msg.metadata.sequence.stream in blocked:
            await held.wait()

    again = await start(readers, Reader(nc, slow), seqs[-1])
    await again.until(stolen)
    assert again.handled == stolen

    # and while running: the handler holds an entry, meanwhile deliveries go elsewhere; the
    # next delivery's count shows the gap, and the consumer is made again from the position
    blocked.extend(await write(nc, 1))
    await wait_for(lambda: len(again.handled) == len(stolen), timeout=5, what="entry in hand")
    lost = await write(nc, 3)
    assert await thieve(nc, 3) == lost
    later = await write(nc, 1)
    held.set()
    await again.until(lost + later)
    assert again.handled == stolen + blocked + lost + later
    assert again.feed.reopened == 1


async def test_a_failing_handler_gets_the_rest_of_its_batch_again_in_order(
    nc: NATS, readers: list[Reader]
) -> None:
    failures = {"left": 2}

    async def flaky(msg: Msg) -> None:
        if msg.metadata.sequence.stream == seqs[1] and failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("KV unavailable for now")

    seqs = await write(nc, 4)
    reader = await start(readers, Reader(nc, flaky), seqs[0] - 1)
    await reader.until(seqs)
    # the first was marked done before the failure: not handed over again
    assert reader.handled == seqs and failures["left"] == 0
    assert sum(f"journal entries from {seqs[1]} not handled" in e for e in reader.errors) == 2


async def test_the_consumer_deleted_under_it_and_nats_restarted_lose_nothing(
    nc: NATS, nats_server: NatsServer, readers: list[Reader]
) -> None:
    reader = await start(readers, Reader(nc), None)
    seqs = await write(nc, 3)
    await reader.until(seqs)

    # an operator deletes it; an old one from seq 1 takes its name (nothing is read twice)
    js = nc.jetstream()
    await js.delete_consumer(subjects.STREAM_JOURNAL, CONSUMER)
    await js.add_consumer(
        subjects.STREAM_JOURNAL,
        ConsumerConfig(
            durable_name=CONSUMER, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE
        ),
    )
    more = await write(nc, 2)
    await reader.until(more)
    assert reader.handled == seqs + more

    # NATS restarted (same port, same store): entries written on either side arrive once
    before = await write(nc, 1)
    await asyncio.to_thread(nats_server.stop)
    await asyncio.to_thread(nats_server.start)
    await wait_for(lambda: nc.is_connected, timeout=15, what="the client reconnected")
    after = [await _retrying(nc, _entry()) for _ in range(2)]
    await reader.until(after)
    assert reader.handled == seqs + more + before + after


async def test_an_older_acknowledged_consumer_is_replaced_from_its_ack_floor(
    nc: NATS, readers: list[Reader]
) -> None:
    js = nc.jetstream()
    old = await js.pull_subscribe(
        subjects.JOURNAL_ALL,
        durable=CONSUMER,
        stream=subjects.STREAM_JOURNAL,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.EXPLICIT),
    )
    seqs = await write(nc, 4)
    for msg in await old.fetch(2, timeout=5):
        await msg.ack_sync(timeout=5)
    await old.unsubscribe()

    reader = await start(readers, Reader(nc), None)
    await reader.until(seqs[2:])
    assert reader.handled == seqs[2:]  # what it had not acknowledged, and only that
    info = await js.consumer_info(subjects.STREAM_JOURNAL, CONSUMER)
    assert info.config.ack_policy == AckPolicy.NONE


async def _retrying(nc: NATS, env: Envelope) -> int:
    """JetStream answers a little after the server is back; the same envelope again is
    de-duplicated, should an earlier attempt have been stored."""
    for _ in range(100):
        with contextlib.suppress(Exception):
            return (await bus.publish(nc.jetstream(), subjects.journal("a", "c1"), env)).seq
        await asyncio.sleep(0.1)
    return (await bus.publish(nc.jetstream(), subjects.journal("a", "c1"), env)).seq
