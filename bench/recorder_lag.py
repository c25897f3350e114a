"""recorder_lag_s: how long a message takes to become queryable while the recorder takes a
sustained 10,000 messages/s (real nats-server, the real recorder process, embedded chDB).

Messages go to BL_EVENTS as core publishes that the stream stores (as `nats pub` does),
paced every 10 ms; the stream's count is checked at the end. Not JetStream publishes with an
ack each: on 2 cores that publisher is the limit (`publish_async` alone: ~13k/s on a busy
machine, ~6k/s next to the recorder), and this measures the recorder. Every 0.5 s one
message is a marker: a task polls the recorder (`bl.query.sql`, the only way into an embedded
engine) every 100 ms for the markers not yet found, and a marker's lag is the time from its
publish to the answer of the first query that finds it (an upper bound, by at most one poll).
Baselines in the same run: the same lag with nothing else published (the floor: flush
interval, insert, query), and raw nats-py receiving the same envelopes
(`recorder.raw_js_receive_per_s`), the ceiling on any recorder's rate.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from beamline import bus, query, subjects
from beamline.process import Process
from beamline.testing import mesh_env, start_service
from bench import recorder

RATE = int(os.environ.get("BENCH_LAG_RATE", "10000"))  # messages/s
SECONDS = float(os.environ.get("BENCH_LAG_SECONDS", "20"))
TICK_S = 0.01  # RATE * TICK_S messages each tick
MARK_EVERY_S = 0.5
POLL_S = 0.1  # the polls are queries the recorder answers while it records
IDLE_MARKERS = 10
TARGET_S = 1.0
# bounded by time, as a tail query is: the sort key (ts, id) then skips every part older
# than the oldest marker sought, so the probe costs the recorder little
FOUND_SQL = """
SELECT id FROM bl_messages
WHERE ts >= fromUnixTimestamp64Micro({since_us:Int64}) AND id IN {ids:Array(String)}
"""
SUBJECT = subjects.event("bench", "tick")

Prepared = tuple[str, int, bytes, dict[str, str]]  # envelope id, its ts (µs), body, headers


def prepare(count: int, offset: int) -> list[Prepared]:
    """Encoded before the clock starts: the publisher's own cost stays out of the rate."""
    out = []
    for i in range(offset, offset + count):
        env = recorder.event(i)
        ts_us = int(env.ts.timestamp() * 1_000_000)
        out.append((env.id, ts_us, bus.encode(env), bus.headers_for(env)))
    return out


class Markers:
    """Markers published and not yet found, found by polling the recorder."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.sent: dict[str, float] = {}  # id -> when it was published (perf_counter)
        self.ts_us: dict[str, int] = {}  # id -> the envelope's ts
        self.lags: list[float] = []

    def mark(self, envelope_id: str, ts_us: int) -> None:
        self.sent[envelope_id] = time.perf_counter()
        self.ts_us[envelope_id] = ts_us

    async def poll_once(self) -> None:
        if not self.sent:
            return
        since = min(self.ts_us[i] for i in self.sent) - 1000
        parameters = {"ids": list(self.sent), "since_us": since}
        found = await query.query(self.nc, FOUND_SQL, parameters, timeout=30)
        now = time.perf_counter()
        for (envelope_id,) in found.rows:
            if envelope_id in self.sent:
                self.lags.append(now - self.sent.pop(envelope_id))

    async def poll(self, stop: asyncio.Event) -> None:
        while not (stop.is_set() and not self.sent):
            await self.poll_once()
            await asyncio.sleep(POLL_S)


async def idle_lag(nc: NATS, messages: list[Prepared]) -> list[float]:
    """One marker at a time, nothing else published: the lag floor."""
    js = nc.jetstream()
    markers = Markers(nc)
    for envelope_id, ts_us, body, headers in messages:
        markers.mark(envelope_id, ts_us)
        await js.publish(SUBJECT, body, headers=headers)
        deadline = time.monotonic() + 30
        while markers.sent and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            await markers.poll_once()
        if markers.sent:
            raise TimeoutError("an idle marker was not found within 30 s")
    return markers.lags


async def loaded_lag(nc: NATS, messages: list[Prepared]) -> tuple[list[float], float]:
    """Publish `messages` at RATE with a marker every MARK_EVERY_S: the lags, and the rate
    achieved."""
    markers = Markers(nc)
    stop = asyncio.Event()
    poller = asyncio.create_task(markers.poll(stop))
    per_tick = max(1, round(RATE * TICK_S))
    mark_every = max(1, round(RATE * MARK_EVERY_S))
    started = time.perf_counter()
    try:
        for n, (envelope_id, ts_us, body, headers) in enumerate(messages):
            if n % per_tick == 0:  # pace: wait for this tick's slot, publish at once if late
                ahead = started + (n // per_tick) * TICK_S - time.perf_counter()
                await asyncio.sleep(max(0.0, ahead))  # a late tick still lets the poller run
            if n % mark_every == 0:
                markers.mark(envelope_id, ts_us)
            await nc.publish(SUBJECT, body, headers=headers)
        await nc.flush()
        elapsed = time.perf_counter() - started
        stop.set()
        await asyncio.wait_for(poller, timeout=120)
    finally:
        poller.cancel()
    return markers.lags, len(messages) / elapsed


def seconds(values: list[float], prefix: str) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        f"{prefix}_p50_s": round(cuts[49], 3),
        f"{prefix}_p95_s": round(cuts[94], 3),
        f"{prefix}_max_s": round(max(values), 3),
    }


async def recorder_lag(nc: NATS, nats_url: str, work: Path) -> dict[str, Any]:
    count = int(RATE * SECONDS)
    idle_messages = prepare(IDLE_MARKERS, 0)
    messages = prepare(count, IDLE_MARKERS)
    env = mesh_env(
        nats_url,
        work,
        BEAMLINE_CLICKHOUSE_URL=f"chdb://{work / 'ch-lag'}",
        BEAMLINE_LOG_LEVEL="WARNING",
    )
    proc: Process = start_service("recorder", env, work / "logs")
    try:
        while await recorder.health(nc) is None:
            if not proc.alive():
                raise RuntimeError(f"recorder exited: {proc.logs()[-2000:]}")
        idle = await idle_lag(nc, idle_messages)
        lags, rate = await loaded_lag(nc, messages)
        stored = (await nc.jetstream().stream_info(subjects.STREAM_EVENTS)).state.messages
        if stored != IDLE_MARKERS + count:
            raise RuntimeError(f"BL_EVENTS holds {stored} of {IDLE_MARKERS + count} messages")
    finally:
        proc.stop()
    stats = seconds(lags, "recorder_lag")
    result: dict[str, Any] = {
        "recorder_lag_s": stats["recorder_lag_p95_s"],  # the figure: p95
        **stats,
        "recorder_lag_markers": len(lags),
        "recorder_lag_publish_per_s": round(rate, 1),
        "recorder_idle_lag_p50_s": round(statistics.median(idle), 3),
        "recorder_lag_target": f"p95 < {TARGET_S:g} s at {RATE} msgs/s",
    }
    result["recorder_lag_vs_idle"] = round(
        result["recorder_lag_p95_s"] / result["recorder_idle_lag_p50_s"], 2
    )
    return result
