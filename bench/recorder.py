"""recorder_rows_per_s (draining a backlog) vs raw_insert_rows_per_s (a bare
clickhouse-connect insert of the same rows, same batch size), in the same run."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from beamline import bus, storage, subjects
from beamline.envelope import Envelope, EventPayload, Kind
from beamline.process import Process
from beamline.rows import envelope_row, insert_rows
from beamline.testing import mesh_env, start_service
from services.recorder.settings import RecorderSettings


def event(i: int) -> Envelope:
    return Envelope(
        kind=Kind.EVENT,
        sender="bench",
        recipient="events",
        conversation_id=f"bench-{i % 1000}",
        payload=EventPayload(name="bench_event", data={"i": i, "note": "x" * 64}),
    )


async def publish_backlog(nc: NATS, count: int) -> list[bytes]:
    js = nc.jetstream()
    envelopes = [event(i) for i in range(count)]
    for chunk in range(0, count, 1000):
        await asyncio.gather(
            *(
                bus.publish(js, subjects.event("bench", "tick"), e)
                for e in envelopes[chunk : chunk + 1000]
            )
        )
    return [bus.encode(e) for e in envelopes]


async def health(nc: NATS) -> dict[str, Any] | None:
    try:
        msg = await nc.request(subjects.health("recorder"), b"", timeout=0.5)
        return dict(json.loads(msg.data))
    except Exception:
        return None


def recorded(status: dict[str, Any]) -> int:
    for key in ("recorded_rows", "rows", "recorded"):
        if key in status:
            return int(status[key])
    raise KeyError(f"no row count in recorder health: {sorted(status)}")


async def recorder_rows_per_s(nc: NATS, nats_url: str, work: Path, count: int) -> dict[str, Any]:
    env = mesh_env(
        nats_url,
        work,
        BEAMLINE_CLICKHOUSE_URL=f"chdb://{work / 'ch-recorder'}",
        BEAMLINE_LOG_LEVEL="WARNING",
    )
    await publish_backlog(nc, count)
    proc: Process = start_service("recorder", env, work / "logs")
    try:
        status = None
        while status is None:
            if not proc.alive():
                raise RuntimeError(f"recorder exited: {proc.logs()[-2000:]}")
            status = await health(nc)
        t0, c0 = time.perf_counter(), recorded(status)
        done = c0
        while done < count:
            await asyncio.sleep(0.05)
            status = await health(nc)
            if status:
                done = recorded(status)
            if time.perf_counter() - t0 > 300:
                raise TimeoutError(f"recorder stored {done}/{count} in 300 s")
        elapsed = time.perf_counter() - t0
    finally:
        proc.stop()
    return {"recorder_rows_per_s": round((count - c0) / elapsed, 1), "recorder_rows": count - c0}


def raw_insert_rows_per_s(work: Path, payloads: list[bytes]) -> dict[str, Any]:
    client = storage.connect(f"chdb://{work / 'ch-raw'}")
    storage.migrate(client)
    rows = [
        envelope_row(
            data,
            subject="bl.events.bench.tick",
            stream=subjects.STREAM_EVENTS,
            stream_seq=i + 1,
            stream_ts_us=0,
            max_message_bytes=1 << 20,
        )
        for i, data in enumerate(payloads)
    ]
    batch = RecorderSettings().batch_size
    started = time.perf_counter()
    for chunk in range(0, len(rows), batch):
        insert_rows(client, rows[chunk : chunk + batch])
    elapsed = time.perf_counter() - started
    return {"raw_insert_rows_per_s": round(len(rows) / elapsed, 1), "raw_insert_batch": batch}


async def raw_js_receive_per_s(nc: NATS, count: int) -> dict[str, Any]:
    """The ceiling under the recorder: raw nats-py receiving the same stored envelopes (with
    their headers) from a push consumer and acking each, doing nothing else."""
    js = nc.jetstream()
    done = asyncio.Event()
    got = 0

    async def on_msg(msg: Any) -> None:
        nonlocal got
        await msg.ack()
        got += 1
        if got >= count:
            done.set()

    started = time.perf_counter()
    sub = await js.subscribe(
        subjects.EVENTS_ALL,
        stream=subjects.STREAM_EVENTS,
        durable="bench-raw",
        cb=on_msg,
        manual_ack=True,
        pending_msgs_limit=-1,
        pending_bytes_limit=-1,
    )
    await asyncio.wait_for(done.wait(), timeout=300)
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    return {"raw_js_receive_per_s": round(count / elapsed, 1)}
