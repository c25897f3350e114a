"""`EventSink` on a real nats-server: a burst of events goes out with many publishes awaiting
their acks at once (one by one, a busy gateway's call events fell seconds behind), lands in
the order emitted, and `close` waits until every one is stored."""

from __future__ import annotations

import json
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

from beamline import bus, subjects
from beamline.events import WINDOW, EventSink

BURST = 300


async def test_a_burst_is_published_windowed_in_order_and_close_waits_for_it(
    nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_flight, most = 0, 0
    publish = bus.publish

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            return await publish(*args, **kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(bus, "publish", counted)  # the module events publishes through
    sink = EventSink(nc.jetstream(), "test")
    sink.start()
    for n in range(BURST):
        sink.emit("tick", {"n": n})
    await sink.close(timeout=30)
    assert sink.published == BURST and sink.dropped == 0
    assert 1 < most <= WINDOW  # acks awaited together, never more than the window

    sub = await nc.jetstream().subscribe(
        subjects.event("test", "tick"), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        got = [json.loads((await sub.next_msg(timeout=5)).data) for _ in range(BURST)]
    finally:
        await sub.unsubscribe()
    assert [e["payload"]["data"]["n"] for e in got] == list(range(BURST))
