"""host_loss_rehome_s: kill -9 of a host running 1,000 supervised agents -> all of them
started again on the other host (confirmed by that host), and a sample answering tasks
sent at the moment of the kill. Next to it, from the same run: the time the supervisor
needs to notice (kill -> host_lost, bounded below by heartbeat interval x misses) and the
time to start 1,000 agents on a live host, which a re-home also pays."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from beamline import ops, subjects
from beamline.runtime import Mesh
from bench import pool

AGENTS = int(os.environ.get("BENCH_REHOME_AGENTS", "1000"))
SAMPLE = 50
TARGET_S = 1.5


async def _host_joined(nc: NATS, host: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = json.loads((await nc.request(subjects.health("supervisor"), b"", 2)).data)
        if host in health["hosts"]:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{host} never joined")


async def host_loss(mesh: Mesh, nc: NATS) -> dict[str, Any]:
    await pool.wait_for_pool(nc)
    mesh.spawn("agent-b", "services.agent", {"BEAMLINE_AGENT_HOST_ID": "host-b"})
    await _host_joined(nc, "host-b")
    t = time.perf_counter()
    agents = await pool.start_members(nc, AGENTS)
    start_s = time.perf_counter() - t
    where = (await ops.admin(nc, "inspect", agents[0]))["host"]
    if where != "host-a":
        raise RuntimeError(f"expected the pool on host-a (it joined first), found {where}")

    seen: dict[str, float] = {}
    rehomed = 0
    all_moved = asyncio.Event()

    async def on_event(msg: Msg) -> None:
        nonlocal rehomed
        name = msg.subject.rsplit(".", 1)[-1]
        data = json.loads(msg.data)["payload"]["data"]
        seen.setdefault(name, time.perf_counter())
        if name in ("agent_rehomed", "children_rehomed"):
            rehomed += data.get("n", 1)
            if rehomed >= len(agents):
                all_moved.set()

    sub = await nc.subscribe("bl.events.supervisor.>", cb=on_event)
    try:
        killed = time.perf_counter()
        mesh.process("agent").kill()  # kill -9 host-a
        answer_s = await pool.ask(nc, agents, SAMPLE, seed=11)  # sent at once, queued
        await asyncio.wait_for(all_moved.wait(), 60)
    finally:
        await sub.unsubscribe()
    rehome_s = seen.get("children_rehomed", seen.get("agent_rehomed", 0.0)) - killed
    return {
        "host_loss_agents": len(agents),
        "host_loss_detect_s": round(seen["host_lost"] - killed, 3),
        "host_loss_rehome_s": round(rehome_s, 3),
        "host_loss_rehome_target": f"<= {TARGET_S} s",
        "host_loss_sample_answered_s": round(answer_s, 3),
        "host_loss_sample": SAMPLE,
        "start_agents_on_live_host_s": round(start_s, 3),
    }
