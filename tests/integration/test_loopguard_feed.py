"""The loop guard's journal feed on a real nats-server: a consumer without acknowledgements
whose position the loop guard keeps. Every entry after the position is handled, in order,
once it succeeds: after a crash with entries in hand, deliveries lost on the way, a
failing handler, the consumer deleted under it, NATS restarted, or an older loop guard's
acknowledged consumer."""

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
from beamline.errors import ConfigError
from beamline.testing import NatsServer, wait_for
from services.loopguard.feed import JournalFeed
from services.loopguard.settings import LoopguardSettings
from services.loopguard.store import PositionStore

SETTINGS = LoopguardSettings(fetch_batch=4, linger_s=0, retry_s=0.05, position_flush_s=0.1)


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
    """A loop guard's feed, running, with what its handler was given (and got through)."""

    def __init__(self, nc: NATS, handle: Callable[[Msg], Awaitable[None]] | None = None) -> None:
        self.nc = nc
        self.handled: list[int] = []
        self.errors: list[str] = []
        self._handle = handle
        self._tasks: list[asyncio.Task[None]] = []
        self.feed: JournalFeed

    async def start(self, keep: bool = True) -> Reader:
        kv = await self.nc.jetstream().key_value(subjects.BUCKET_LOOPGUARD)
        self.feed = JournalFeed(
            self.nc.jetstream(), PositionStore(kv), SETTINGS, self.errors.append
        )
        await self.feed.open()
        self._tasks.append(asyncio.create_task(self.feed.run(self.on_entry)))
        if keep:
            self._tasks.append(asyncio.create_task(self.feed.keep()))
        return self

    async def on_entry(self, msg: Msg) -> None:
        if self._handle is not None:
            await self._handle(msg)
        self.handled.append(msg.metadata.sequence.stream)

    async def until(self, seqs: list[int]) -> None:
        async def done() -> bool:
            return self.handled[-len(seqs) :] == seqs if len(self.handled) >= len(seqs) else False

        await wait_for(done, timeout=15, what=f"entries {seqs} handled; got {self.handled}")

    async def crash(self) -> None:
        """Stopped without persisting the position: what a killed process leaves."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def readers(nc: NATS) -> AsyncIterator[list[Reader]]:
    started: list[Reader] = []
    try:
        yield started
    finally:
        for reader in started:
            with contextlib.suppress(Exception):
                await reader.crash()


async def saved(nc: NATS) -> int:
    kv = await nc.jetstream().key_value(subjects.BUCKET_LOOPGUARD)
    return (await PositionStore(kv).load()).seq


async def test_a_first_start_watches_from_now_and_a_crash_reads_again_what_was_in_hand(
    nc: NATS, readers: list[Reader]
) -> None:
    before = await write(nc, 3)
    first = await Reader(nc).start(keep=False)
    readers.append(first)
    assert first.feed.seq == before[-1] and await saved(nc) == before[-1]  # from now on

    seqs = await write(nc, 6)
    await first.until(seqs)
    assert first.handled == seqs  # in order, once, nothing from before its first start
    await first.crash()  # its position was never persisted past the first start
    assert await saved(nc) == before[-1]

    # the consumer delivered everything; the position says nothing was finished: read again
    second = await Reader(nc).start()
    readers.append(second)
    more = await write(nc, 2)
    await second.until(seqs + more)
    assert second.handled == seqs + more
    await wait_for(lambda: _is(saved(nc), more[-1]), timeout=5, what="the position persisted")


async def test_deliveries_lost_on_the_way_are_read_again(nc: NATS, readers: list[Reader]) -> None:
    js = nc.jetstream()
    reader = await Reader(nc).start()
    readers.append(reader)
    seqs = await write(nc, 2)
    await reader.until(seqs)
    await wait_for(lambda: _is(saved(nc), seqs[-1]), timeout=5, what="the position persisted")
    # something else takes deliveries of the consumer, as a pull answered into a lost
    # connection would: after a crash, the next start finds the consumer past the position
    await reader.crash()
    thief = await js.pull_subscribe_bind(
        durable=subjects.CONSUMER_LOOPGUARD, stream=subjects.STREAM_JOURNAL
    )
    stolen = await write(nc, 2)
    assert [m.metadata.sequence.stream for m in await thief.fetch(2, timeout=5)] == stolen
    await thief.unsubscribe()
    held = asyncio.Event()
    blocked: list[int] = []

    async def slow(msg: Msg) -> None:
        if msg.metadata.sequence.stream in blocked:
            await held.wait()

    again = await Reader(nc, slow).start()
    readers.append(again)
    await again.until(stolen)
    assert again.handled == stolen

    # and while running: the handler holds an entry, meanwhile deliveries go elsewhere; the
    # next delivery's count shows the gap, and the consumer is made again from the position
    blocked.extend(await write(nc, 1))
    await wait_for(lambda: again.feed.seq == stolen[-1], timeout=5, what="entry in hand")
    thief = await js.pull_subscribe_bind(
        durable=subjects.CONSUMER_LOOPGUARD, stream=subjects.STREAM_JOURNAL
    )
    lost = await write(nc, 3)
    assert [m.metadata.sequence.stream for m in await thief.fetch(3, timeout=5)] == lost
    await thief.unsubscribe()
    later = await write(nc, 1)
    held.set()
    await again.until(lost + later)
    assert again.handled == stolen + blocked + lost + later
    assert again.feed.reopened == 1


async def test_a_failing_handler_gets_the_same_entry_again_in_order(
    nc: NATS, readers: list[Reader]
) -> None:
    failures = {"left": 2}

    async def flaky(msg: Msg) -> None:
        if msg.metadata.sequence.stream == seqs[1] and failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("KV unavailable for now")

    reader = await Reader(nc, flaky).start()
    readers.append(reader)
    seqs = await write(nc, 4)
    await reader.until(seqs)
    assert reader.handled == seqs and failures["left"] == 0
    assert sum(f"journal entry {seqs[1]} not handled" in e for e in reader.errors) == 2


async def test_the_consumer_deleted_under_it_and_nats_restarted_lose_nothing(
    nc: NATS, nats_server: NatsServer, readers: list[Reader]
) -> None:
    reader = await Reader(nc).start()
    readers.append(reader)
    seqs = await write(nc, 3)
    await reader.until(seqs)

    # an operator deletes it; an old one from seq 1 takes its name (nothing is read twice)
    js = nc.jetstream()
    await js.delete_consumer(subjects.STREAM_JOURNAL, subjects.CONSUMER_LOOPGUARD)
    await js.add_consumer(
        subjects.STREAM_JOURNAL,
        ConsumerConfig(
            durable_name=subjects.CONSUMER_LOOPGUARD,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
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


async def test_an_older_loop_guards_acknowledged_consumer_goes_on_from_its_ack_floor(
    nc: NATS, readers: list[Reader]
) -> None:
    js = nc.jetstream()
    old = await js.pull_subscribe(
        subjects.JOURNAL_ALL,
        durable=subjects.CONSUMER_LOOPGUARD,
        stream=subjects.STREAM_JOURNAL,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.EXPLICIT),
    )
    seqs = await write(nc, 4)
    for msg in await old.fetch(2, timeout=5):
        await msg.ack_sync(timeout=5)
    await old.unsubscribe()

    reader = await Reader(nc).start()
    readers.append(reader)
    await reader.until(seqs[2:])
    assert reader.handled == seqs[2:]  # what it had not acknowledged, and only that
    info = await js.consumer_info(subjects.STREAM_JOURNAL, subjects.CONSUMER_LOOPGUARD)
    assert info.config.ack_policy == AckPolicy.NONE


async def test_an_unreadable_position_stops_the_start_naming_the_key(nc: NATS) -> None:
    kv = await nc.jetstream().key_value(subjects.BUCKET_LOOPGUARD)
    await kv.put("position", b'{"seq": -4}')
    feed = JournalFeed(nc.jetstream(), PositionStore(kv), SETTINGS, lambda _: None)
    with pytest.raises(ConfigError, match="BL_LOOPGUARD/position"):
        await feed.open()


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _retrying(nc: NATS, env: Envelope) -> int:
    """JetStream answers a little after the server is back; the same envelope again is
    de-duplicated, should an earlier attempt have been stored."""
    for _ in range(100):
        with contextlib.suppress(Exception):
            return (await bus.publish(nc.jetstream(), subjects.journal("a", "c1"), env)).seq
        await asyncio.sleep(0.1)
    return (await bus.publish(nc.jetstream(), subjects.journal("a", "c1"), env)).seq
