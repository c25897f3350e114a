"""`KVRecord` on a real nats-server's KV: saves are group-committed (a burst costs one write,
and each caller's change is in the write it waits for), a conflicting writer fails every
caller waiting on that write, and a write of its own that landed unanswered is no conflict."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Awaitable
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from beamline import subjects
from beamline.kvrecord import KVRecord, RecordConflict
from beamline.testing import NatsServer, wait_for

ROOT = Path(__file__).parents[2]


class Tally(BaseModel):
    seen: list[int] = Field(default_factory=list)


async def bucket(nc: NATS) -> KeyValue:
    return await nc.jetstream().key_value(subjects.BUCKET_BUDGET)


def record(kv: KeyValue) -> KVRecord[Tally]:
    return KVRecord(
        kv, subjects.BUCKET_BUDGET, "tally", Tally, what="a tally", forgets="-", service="test"
    )


async def stored(kv: KeyValue) -> list[int]:
    return Tally.model_validate_json((await kv.get("tally")).value or b"{}").seen


async def test_a_burst_of_saves_is_one_write_holding_every_change(nc: NATS) -> None:
    kv = await bucket(nc)
    store, tally = record(kv), Tally()

    async def change(i: int) -> None:
        tally.seen.append(i)
        await store.save(tally)

    await asyncio.gather(*(change(i) for i in range(50)))
    assert store.writes == 1
    assert await stored(kv) == list(range(50))


async def test_a_save_during_a_write_waits_for_the_next_write_which_has_its_change(
    nc: NATS,
) -> None:
    kv = await bucket(nc)
    store, tally = record(kv), Tally(seen=[1])
    first = asyncio.create_task(store.save(tally))
    for _ in range(3):  # the first save, then its writer, run: a write with [1] is under way
        await asyncio.sleep(0)
    tally.seen.append(2)
    await store.save(tally)
    assert first.done() and store.writes == 2
    assert await stored(kv) == [1, 2]
    assert (await record(kv).load()).seen == [1, 2]


async def test_a_cancelled_caller_does_not_fail_the_others_sharing_its_write(nc: NATS) -> None:
    kv = await bucket(nc)
    store, tally = record(kv), Tally(seen=[7])
    quitter = asyncio.create_task(store.save(tally))
    stayer = asyncio.create_task(store.save(tally))
    await asyncio.sleep(0)
    quitter.cancel()
    await stayer
    assert quitter.cancelled()
    assert await stored(kv) == [7]


async def test_a_second_writer_fails_every_save_waiting_on_the_write(nc: NATS) -> None:
    kv = await bucket(nc)
    store, tally = record(kv), Tally(seen=[1])
    await store.save(tally)
    await kv.put("tally", Tally(seen=[99]).model_dump_json().encode())  # another instance

    tally.seen.append(2)
    outcomes = await asyncio.gather(store.save(tally), store.save(tally), return_exceptions=True)
    assert all(isinstance(o, RecordConflict) for o in outcomes), outcomes
    assert "second test service running" in str(outcomes[0])
    assert await stored(kv) == [99]  # the other writer's value is not overwritten
    with pytest.raises(RecordConflict):  # and it stays refused: this copy is stale
        await store.save(tally)


async def test_a_service_whose_record_another_instance_wrote_exits_70(
    nats_server: NatsServer, nc: NATS
) -> None:
    """What the budget service and the loop guard do on a conflict (save_or_exit): stop,
    so the instance left running is the one whose state is persisted."""
    script = textwrap.dedent(
        f"""
        import asyncio
        from beamline import bus, subjects
        from tests.integration.test_kvrecord import Tally, record

        async def main() -> None:
            nc = await bus.connect("{nats_server.url}", "first-instance")
            kv = await nc.jetstream().key_value(subjects.BUCKET_BUDGET)
            store = record(kv)
            await store.save_or_exit(Tally(seen=[1]))
            await kv.put("tally", b'{{"seen": [99]}}')  # a second instance wrote it
            await store.save_or_exit(Tally(seen=[2]))
            print("went on after the conflict")

        asyncio.run(main())
        """
    )
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 70, run.stderr
    assert "a tally written by another instance; exiting" in run.stderr
    assert "went on" not in run.stdout
    assert await stored(await bucket(nc)) == [99]


async def test_a_write_that_landed_unanswered_is_gone_on_from_and_a_stranger_still_conflicts(
    nc: NATS, nats_server: NatsServer
) -> None:
    kv = await nc.jetstream(timeout=1.0).key_value(subjects.BUCKET_BUDGET)
    store, tally = record(kv), Tally(seen=[1])
    await store.save(tally)

    # NATS goes away mid-write: no answer within the timeout, but the write is sent once
    # the client is back, and lands
    await asyncio.to_thread(nats_server.stop)
    tally.seen.append(2)
    with pytest.raises(Exception) as lost:
        await store.save(tally)
    assert not isinstance(lost.value, RecordConflict)
    await asyncio.to_thread(nats_server.start)
    await wait_for(lambda: nc.is_connected, timeout=15, what="the client reconnected")
    await wait_for(lambda: _is(stored(kv), [1, 2]), timeout=10, what="the lost write landed")

    # the next save finds the revision moved by its own write: no second writer
    tally.seen.append(3)
    await store.save(tally)
    assert await stored(kv) == [1, 2, 3]

    # a write that is not its own still stops it
    entry = await kv.get("tally")
    await kv.update("tally", b'{"seen": [99]}', last=entry.revision)
    with pytest.raises(RecordConflict, match="second test service"):
        await store.save(tally)


async def _is(value: Awaitable[list[int]], expected: list[int]) -> bool:
    return await value == expected
