"""agents_per_host, bytes_per_idle_agent, nats_server_rss_mib: idle agents started in one
host process, 10,000 at a time, as members of a supervised simple_one_for_one pool, each
with its mailbox in the sharded, file-backed BL_MAILBOX stream. The host's and the
nats-server's resident memory is read after each step; the host's baseline is its RSS with
the tree up and no member yet, measured in the same run. At the end a random sample of
members each answers a task through the gateway and fakellm: the mailboxes are real."""

from __future__ import annotations

import os
import time
from typing import Any

from nats.aio.client import Client as NATS

from beamline.runtime import Mesh
from bench import pool

TARGET = int(os.environ.get("BENCH_DENSITY_AGENTS", "100000"))
STEP = 10_000
SAMPLE = 200
TARGET_BYTES = 4096
TARGET_NATS_MIB = 200


async def density(mesh: Mesh, nc: NATS) -> dict[str, Any]:
    host = mesh.process("agent").popen.pid
    server = mesh.process("nats-server").popen.pid
    await pool.wait_for_pool(nc)
    base_host, base_nats = pool.rss_mib(host), pool.rss_mib(server)
    agents: list[str] = []
    growth: list[str] = []
    started = time.perf_counter()
    while len(agents) < TARGET:
        try:
            agents += await pool.start_members(nc, min(STEP, TARGET - len(agents)))
        except Exception as exc:  # as many as fit: report where it stopped, and why
            growth.append(f"stopped at {len(agents)}: {exc!r}")
            break
        extra = (pool.rss_mib(host) - base_host) * 1024 * 1024 / len(agents)
        growth.append(f"{len(agents)}: +{extra:.0f} B/agent, nats {pool.rss_mib(server):.0f} MiB")
    start_s = time.perf_counter() - started
    host_mib, nats_mib = pool.rss_mib(host), pool.rss_mib(server)
    answer_s = await pool.ask(nc, agents, SAMPLE)
    per_agent = (host_mib - base_host) * 1024 * 1024 / max(len(agents), 1)
    return {
        "agents_per_host": len(agents),
        "bytes_per_idle_agent": round(per_agent),
        "bytes_per_idle_agent_target": f"<= {TARGET_BYTES}",
        "agents_host_baseline_rss_mib": round(base_host, 1),
        "agents_host_rss_mib": round(host_mib, 1),
        "nats_server_rss_mib": round(nats_mib, 1),
        "nats_server_baseline_rss_mib": round(base_nats, 1),
        "nats_server_rss_target": f"< {TARGET_NATS_MIB} MiB",
        "agents_start_per_s": round(len(agents) / start_s),
        "agents_sample_answered": SAMPLE,
        "agents_sample_answer_s": round(answer_s, 2),
        "agents_memory_growth": growth,
    }
