"""`beamline.service.every`, the periodic loop of the services' timed writes and checks
(the budget's itemisation, the loop guard's journal position and escalation deadlines): a
tick that fails is reported and the next one runs anyway."""

from __future__ import annotations

import asyncio

from beamline.service import every


async def test_a_failed_tick_is_reported_and_the_loop_goes_on() -> None:
    ticks: list[int] = []
    errors: list[str] = []
    done = asyncio.Event()

    async def action() -> None:
        ticks.append(len(ticks))
        if len(ticks) <= 2:
            raise ConnectionError("KV unavailable for now")
        if len(ticks) == 4:
            done.set()

    loop = asyncio.create_task(every(0.001, action, "position not saved", errors.append))
    try:
        await asyncio.wait_for(done.wait(), timeout=5)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert ticks[:4] == [0, 1, 2, 3]
    assert errors == ["position not saved: ConnectionError('KV unavailable for now')"] * 2
    assert loop.cancelled()
