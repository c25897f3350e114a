"""Leader election on a real nats-server's KV: one leader, a standby that takes over only
after the lease lapses, terms that only grow, and a deposed leader that knows it."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS

from beamline import subjects
from services.supervisor.lease import Lease


async def test_one_leads_the_other_takes_over_after_the_lease(nc: NATS) -> None:
    kv = await nc.jetstream().key_value(subjects.BUCKET_SUPERVISOR)
    stop = asyncio.Event()
    first, second = Lease(kv, "one", 0.4), Lease(kv, "two", 0.4)
    assert await first.acquire(stop)

    standby = asyncio.create_task(second.acquire(stop))
    for _ in range(4):  # renewed in time: the standby keeps waiting
        await asyncio.sleep(0.1)
        assert await first.renew()
    assert not standby.done()
    assert second.leader == "one"

    assert await asyncio.wait_for(standby, 3)  # `one` went silent: `two` takes over
    assert second.term > first.term
    assert not await first.renew()  # the deposed leader learns it on its next renewal


async def test_a_released_lease_is_taken_at_once(nc: NATS) -> None:
    kv = await nc.jetstream().key_value(subjects.BUCKET_SUPERVISOR)
    stop = asyncio.Event()
    first, second = Lease(kv, "one", 30), Lease(kv, "two", 30)
    assert await first.acquire(stop)
    await first.release()
    assert await asyncio.wait_for(second.acquire(stop), 5)  # not after 30 s


async def test_a_standby_stops_waiting_when_told(nc: NATS) -> None:
    kv = await nc.jetstream().key_value(subjects.BUCKET_SUPERVISOR)
    stop = asyncio.Event()
    assert await Lease(kv, "one", 30).acquire(stop)
    waiting = asyncio.create_task(Lease(kv, "two", 30).acquire(stop))
    await asyncio.sleep(0.2)
    stop.set()
    assert await asyncio.wait_for(waiting, 5) is False


async def test_standing_by_leaves_no_tasks_behind(nc: NATS) -> None:
    """A standby polls ten times a lease; each poll must not leave a waiter task behind."""
    kv = await nc.jetstream().key_value(subjects.BUCKET_SUPERVISOR)
    stop = asyncio.Event()
    leader = Lease(kv, "one", 1.0)
    assert await leader.acquire(stop)
    waiting = asyncio.create_task(Lease(kv, "two", 1.0).acquire(stop))
    await asyncio.sleep(0.2)
    before = len(asyncio.all_tasks())
    for _ in range(6):  # ~12 polls of the standby, the lease renewed in time
        await asyncio.sleep(0.2)
        assert await leader.renew()
    assert len(asyncio.all_tasks()) <= before
    stop.set()
    assert await asyncio.wait_for(waiting, 5) is False
