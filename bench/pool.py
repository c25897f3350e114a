"""What the density and host-loss benches share: a deployment whose agents are members of
one simple_one_for_one pool (started at run time, supervised, each with its mailbox in the
sharded BL_MAILBOX stream), how to start them, ask a sample of them, and read memory."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from beamline import client, ops, subjects
from bench import local_nats

CONFIG = """
version: 1
providers:
  fakellm: {kind: openai, base_url: "${BEAMLINE_FAKELLM_URL}/v1", timeout_s: 30,
            context_window: 128000}
agents:
  - {name: idle, role: idle, system_prompt: idle, models: [{provider: fakellm, model: m}]}
supervisors:
  - name: root
    strategy: one_for_one
    intensity: 100
    period: 1
    children: [{supervisor: pool}]
  - name: pool
    strategy: simple_one_for_one
    intensity: 1000
    period: 1
    children: [{agent: idle}]
"""
SCRIPT = 'default: {text: "ok: {last_user}"}\n'
START_CHUNK = 10_000  # members per start_child request (the request's limit)


def write_inputs(work: Path) -> tuple[Path, Path]:
    return local_nats.write_inputs(work, "pool", CONFIG, SCRIPT)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def wait_for_pool(nc: NATS, timeout: float = 60) -> None:
    """Until the leader answers with the pool up (the tree has started)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            tree = await ops.admin(nc, "tree", timeout=2)
            if tree and tree["children"][0]["up"]:
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError("the pool did not come up")
        await asyncio.sleep(0.2)


async def start_members(nc: NATS, count: int) -> list[str]:
    started: list[str] = []
    while len(started) < count:
        n = min(START_CHUNK, count - len(started))
        answer = await ops.admin(nc, "start_child", "pool", timeout=300, count=n)
        if answer["n"] != n:
            raise RuntimeError(f"asked for {n} members, {answer['n']} started")
        first = int(answer["started"][0].rsplit("-", 1)[1])
        started.extend(f"idle-{i}" for i in range(first, first + n))
    return started


async def ask(nc: NATS, agents: list[str], sample: int, seed: int = 7) -> float:
    """Send one task to each of `sample` random agents; seconds until all have answered."""
    chosen = random.Random(seed).sample(agents, min(sample, len(agents)))
    pending: set[str] = set()
    done = asyncio.Event()

    async def on_reply(msg: Msg) -> None:
        pending.discard(json.loads(msg.data)["conversation_id"])
        if not pending:
            done.set()

    sub = await nc.subscribe(subjects.REPLIES_ALL, cb=on_reply)
    started = time.perf_counter()
    try:
        pending.update(f"ask-{seed}-{agent}" for agent in chosen)
        for agent in chosen:
            conversation = f"ask-{seed}-{agent}"
            await client.submit(nc, subjects.inbox(agent), f"hi {agent}", conversation)
        await asyncio.wait_for(done.wait(), 120)
    finally:
        await sub.unsubscribe()
    return time.perf_counter() - started
