"""restart_p50/p99_ms: an agent's code raises -> its replacement started by the supervisor,
measured by the host (crash -> successor started, including the exit report to the
supervisor, its decision and the start command). The floor, in the same run: an asyncio
task that raises, replaced by a new task in the same process."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from beamline import client, subjects
from bench import local_nats

CRASHES_DEFAULT = 1000

CONFIG = """
version: 1
tools_modules: [bench.crash_tools]
providers:
  fakellm: {kind: openai, base_url: "${BEAMLINE_FAKELLM_URL}/v1", timeout_s: 30,
            context_window: 128000}
agents:
  - {name: crasher, role: crash, system_prompt: crasher, models: [{provider: fakellm, model: m}], tools: [crash_once]}
supervisors:
  - name: root
    strategy: one_for_one
    intensity: 1000000    # the bench crashes on purpose: never give up
    period: 1
    children: [{agent: crasher}]
"""
SCRIPT = """
rules:
  - match: {system_contains: crasher, last_role: user}
    respond: {tool_calls: [{name: crash_once, arguments: {key: "{last_user}"}}]}
default: {text: "done: {last_tool_result}"}
"""


def write_inputs(work: Path) -> tuple[Path, Path]:
    return local_nats.write_inputs(work, "restart", CONFIG, SCRIPT)


def percentiles(name: str, samples_ms: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return {f"{name}_p50_ms": round(cuts[49], 3), f"{name}_p99_ms": round(cuts[98], 3)}


async def restart_ms(nc: NATS, crashes: int) -> dict[str, Any]:
    """One task per crash, all queued at once; the agent works through them one by one."""
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_reply(msg: Msg) -> None:
        replies.put_nowait(msg.data)

    sub = await nc.subscribe("bl.reply.>", cb=on_reply)
    started = time.perf_counter()
    for i in range(crashes):
        await client.submit(nc, subjects.inbox("crasher"), f"k{i}", conversation_id=f"r{i}")
    failed = 0
    for _ in range(crashes):
        failed += json.loads(await asyncio.wait_for(replies.get(), 120))["kind"] != "reply"
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    health = json.loads((await nc.request(subjects.health("agent"), b"", timeout=5)).data)
    samples: list[float] = health["restart_ms"]
    if failed or len(samples) < crashes:
        raise RuntimeError(f"{failed} tasks failed, {len(samples)} restarts of {crashes} seen")
    return {
        **percentiles("restart", samples[-crashes:]),
        "restart_crashes": crashes,
        "restart_tasks_per_s": round(crashes / elapsed, 1),
    }


async def asyncio_restart_ms(count: int) -> dict[str, Any]:
    """The floor: a task raises, the waiting 'supervisor' starts a new one that runs."""

    async def crash() -> None:
        raise RuntimeError("crash")

    async def successor(running: asyncio.Event) -> None:
        running.set()

    samples = []
    for _ in range(count):
        try:
            await asyncio.create_task(crash())
        except RuntimeError:
            t0 = time.perf_counter()
            running = asyncio.Event()
            replacement = asyncio.create_task(successor(running))
            await running.wait()
            samples.append((time.perf_counter() - t0) * 1000)
            await replacement
    return percentiles("asyncio_restart", samples)
