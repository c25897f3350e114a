"""`pull_forever` on a real nats-server: batches handled in order, a batch that was not full
followed by a linger that lets the next one gather, and the subscription closed when the
loop is cancelled."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from beamline.pulling import pull_forever
from beamline.testing import wait_for

LINGER_S = 1.0


async def test_after_a_short_batch_the_loop_lingers_and_the_next_batch_gathers(
    nc: NATS,
) -> None:
    js = nc.jetstream()
    await js.add_stream(name="PULLING", subjects=["pulling.>"])
    sub = await js.pull_subscribe("pulling.>", durable="test", stream="PULLING")
    batches: list[list[bytes]] = []
    errors: list[str] = []

    async def handle(msgs: list[Msg]) -> None:
        batches.append([m.data for m in msgs])
        for msg in msgs:
            await msg.ack()

    await js.publish("pulling.a", b"0")
    loop = asyncio.create_task(pull_forever(sub, 100, handle, "test", errors.append, LINGER_S))
    try:
        await wait_for(lambda: _at_least(batches, 1), timeout=10, what="the first batch")
        for i in range(1, 6):  # all within the linger after the first batch
            await js.publish("pulling.a", str(i).encode())
        await wait_for(lambda: _at_least(batches, 2), timeout=10, what="the second batch")
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert batches == [[b"0"], [b"1", b"2", b"3", b"4", b"5"]]
    assert not errors
    # acknowledged, every one: nothing is left for the consumer to deliver
    info = await js.consumer_info("PULLING", "test")
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def _at_least(batches: list[list[bytes]], n: int) -> bool:
    return len(batches) >= n
