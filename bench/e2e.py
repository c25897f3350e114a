"""e2e_tasks_per_s vs raw_js_consume_per_s, on the same nats-server in the same run."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from beamline import bus, subjects
from beamline.envelope import Envelope, Kind, TaskPayload
from bench import local_nats

AGENTS = 200

CONFIG = """
version: 1
providers:
  fakellm: {kind: openai, base_url: "${BEAMLINE_FAKELLM_URL}/v1", timeout_s: 30,
            context_window: 128000}
agents:
""" + "".join(
    f"  - {{name: a{i}, role: bench, models: [{{provider: fakellm, model: m}}]}}\n"
    for i in range(AGENTS)
)

SCRIPT = 'default: {text: "ok: {last_user}"}\n'


def write_inputs(work: Path) -> tuple[Path, Path]:
    return local_nats.write_inputs(work, "bench", CONFIG, SCRIPT)


def task(i: int, prefix: str = "bench") -> Envelope:
    return Envelope(
        kind=Kind.TASK,
        sender="bench",
        recipient="bench",
        conversation_id=f"{prefix}-{i}",
        payload=TaskPayload(prompt=f"task number {i}"),
    )


async def e2e_tasks_per_s(nc: NATS, count: int, prefix: str = "bench") -> dict[str, Any]:
    """`count` tasks, each a conversation of its own (`prefix`-i), published at once; the
    rate is tasks over the time until every one is answered."""
    js = nc.jetstream()
    done = asyncio.Event()
    replies = 0

    async def on_reply(_msg: Any) -> None:
        nonlocal replies
        replies += 1
        if replies >= count:
            done.set()

    sub = await nc.subscribe(subjects.REPLIES_ALL, cb=on_reply)
    envelopes = [task(i, prefix) for i in range(count)]
    started = time.perf_counter()
    for chunk in range(0, count, 500):
        await asyncio.gather(
            *(bus.publish(js, subjects.task("bench"), e) for e in envelopes[chunk : chunk + 500])
        )
    await asyncio.wait_for(done.wait(), timeout=600)
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    return {
        "e2e_tasks_per_s": round(count / elapsed, 1),
        "e2e_tasks": count,
        "e2e_seconds": round(elapsed, 2),
    }


async def raw_js_consume_per_s(nc: NATS, count: int) -> dict[str, Any]:
    """Raw nats-py: JetStream pull (fetch 100) + ack of the same task payloads."""
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH_RAW", subjects=["bench.raw"]))
    payload = bus.encode(task(0))
    for chunk in range(0, count, 500):
        await asyncio.gather(
            *(js.publish("bench.raw", payload) for _ in range(min(500, count - chunk)))
        )
    sub = await js.pull_subscribe("bench.raw", durable="raw", stream="BENCH_RAW")
    got = 0
    started = time.perf_counter()
    while got < count:
        for msg in await sub.fetch(100, timeout=5):
            await msg.ack()
            got += 1
    elapsed = time.perf_counter() - started
    await js.delete_stream("BENCH_RAW")
    return {"raw_js_consume_per_s": round(count / elapsed, 1)}


async def raw_http_per_s(fakellm_url: str, count: int) -> dict[str, Any]:
    """The floor under any task: bare httpx -> fakellm chat completions, at the concurrency
    that serves best on this machine (a few connections; see services/gateway/http_pool.py)."""
    import httpx

    body = {"model": "m", "messages": [{"role": "user", "content": "task number 1"}]}
    best = 0.0
    for connections in (1, 4, 8):
        async with httpx.AsyncClient(
            base_url=fakellm_url, limits=httpx.Limits(max_connections=connections)
        ) as client:
            gate = asyncio.Semaphore(connections)

            async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore) -> None:
                async with gate:
                    (await client.post("/v1/chat/completions", json=body)).raise_for_status()

            started = time.perf_counter()
            await asyncio.gather(*(one(client, gate) for _ in range(count)))
            best = max(best, count / (time.perf_counter() - started))
    return {"raw_http_per_s": round(best, 1)}
