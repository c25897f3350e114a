"""`make bench`: Beamline's figures next to baselines measured in the same run.

Prints a table and writes bench/results/latest.json. Sized for a 2-core machine.

`python -m bench NAME...` runs only the benches named (e2e, restart, recorder,
trace_lookup, recorder_lag, density, rehome, guard_overhead) and updates their figures in latest.json,
keeping the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from beamline import bus
from bench import density, e2e, guard_overhead, pool, recorder, recorder_lag, rehome, restart
from bench.local_nats import local_mesh, local_nats

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
E2E_TASKS = int(os.environ.get("BENCH_E2E_TASKS", "3000"))
RECORDER_ROWS = int(os.environ.get("BENCH_RECORDER_ROWS", "100000"))
# the supervisor's settle time between batched starts, short: the benches start many agents
SETTLE_FAST = {"BEAMLINE_SUPERVISOR_SETTLE_S": "0.2"}


async def bench_e2e(work: Path) -> dict[str, Any]:
    config, script = e2e.write_inputs(work)
    async with local_mesh(work, config, script) as (mesh, nc):
        await e2e.e2e_tasks_per_s(nc, 200)  # warm up: imports, connections, caches
        result = await e2e.e2e_tasks_per_s(nc, E2E_TASKS)
        # raw JetStream on a server of its own: the mesh's users touch only its streams
        async with local_nats(work / "raw") as (_, raw_nc):
            result.update(await e2e.raw_js_consume_per_s(raw_nc, E2E_TASKS * 10))
        fakellm = f"http://127.0.0.1:{mesh.options.fakellm_port}"
        result.update(await e2e.raw_http_per_s(fakellm, min(E2E_TASKS, 2000)))
    result["e2e_ratio_vs_raw"] = round(
        result["e2e_tasks_per_s"] / result["raw_js_consume_per_s"], 4
    )
    result["e2e_target"] = ">= 1/16 = 0.0625 of raw"
    result["e2e_ratio_vs_raw_http"] = round(result["e2e_tasks_per_s"] / result["raw_http_per_s"], 3)
    return result


async def bench_recorder(work: Path) -> dict[str, Any]:
    async with local_nats(work) as (server, nc):
        payloads = [bus.encode(recorder.event(i)) for i in range(RECORDER_ROWS)]
        result = await recorder.recorder_rows_per_s(nc, server.url, work, RECORDER_ROWS)
        result.update(await recorder.raw_js_receive_per_s(nc, RECORDER_ROWS))
    result.update(await asyncio.to_thread(recorder.raw_insert_rows_per_s, work, payloads))
    result["recorder_ratio_vs_raw"] = round(
        result["recorder_rows_per_s"] / result["raw_insert_rows_per_s"], 3
    )
    result["recorder_target"] = ">= 0.70 of raw"
    result["recorder_ratio_vs_raw_receive"] = round(
        result["recorder_rows_per_s"] / result["raw_js_receive_per_s"], 3
    )
    return result


async def bench_trace_lookup(work: Path) -> dict[str, Any]:
    """In a process of its own: chDB opens one data path per process, and its memory (the
    10M-row insert) goes back when that process ends."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bench.trace_lookup", str(work / "chdb")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.trace_lookup failed: {done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def bench_recorder_lag(work: Path) -> dict[str, Any]:
    async with local_nats(work) as (server, nc):
        result = await recorder_lag.recorder_lag(nc, server.url, work)
        # the same envelopes, now stored in BL_EVENTS, read by raw nats-py
        count = min(int(recorder_lag.RATE * recorder_lag.SECONDS), RECORDER_ROWS)
        raw = await recorder.raw_js_receive_per_s(nc, count)
        result["recorder_lag_raw_receive_per_s"] = raw["raw_js_receive_per_s"]
    result["recorder_lag_rate_vs_raw_receive"] = round(
        result["recorder_lag_publish_per_s"] / result["recorder_lag_raw_receive_per_s"], 3
    )
    return result


async def bench_restart(work: Path) -> dict[str, Any]:
    config, script = restart.write_inputs(work)
    crashes = int(os.environ.get("BENCH_RESTART_CRASHES", restart.CRASHES_DEFAULT))
    async with local_mesh(work, config, script, SETTLE_FAST) as (_, nc):
        result = await restart.restart_ms(nc, crashes)
    result.update(await restart.asyncio_restart_ms(crashes))
    result["restart_ratio_vs_asyncio"] = round(
        result["restart_p50_ms"] / result["asyncio_restart_p50_ms"], 1
    )
    result["restart_target"] = "p50 <= 2 ms"
    return result


async def bench_density(work: Path) -> dict[str, Any]:
    config, script = pool.write_inputs(work)
    async with local_mesh(work, config, script, SETTLE_FAST) as (m, nc):
        return await density.density(m, nc)


async def bench_rehome(work: Path) -> dict[str, Any]:
    config, script = pool.write_inputs(work)
    env = {
        **SETTLE_FAST,
        "BEAMLINE_AGENT_HOST_ID": "host-a",
        # host-b joins as a spare: rebalancing would hand it half of host-a's agents first
        "BEAMLINE_SUPERVISOR_REBALANCE_ON_JOIN": "false",
    }
    async with local_mesh(work, config, script, env) as (m, nc):
        return await rehome.host_loss(m, nc)


async def bench_guard_overhead(work: Path) -> dict[str, Any]:
    return await guard_overhead.guard_overhead(work, E2E_TASKS)


BENCHES: dict[str, Callable[[Path], Awaitable[dict[str, Any]]]] = {
    "e2e": bench_e2e,
    "restart": bench_restart,
    "recorder": bench_recorder,
    "trace_lookup": bench_trace_lookup,
    "recorder_lag": bench_recorder_lag,
    "density": bench_density,
    "rehome": bench_rehome,
    "guard_overhead": bench_guard_overhead,
}


async def main(names: list[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix="beamline-bench-"))
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "benches": names,
        # other work on the machine moves every figure; the baselines move with it
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }
    measured: dict[str, Any] = {}
    try:
        for name in names:
            (work / name).mkdir()
            measured.update(await BENCHES[name](work / name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    latest = RESULTS / "latest.json"
    kept: dict[str, Any] = {}
    if set(names) != set(BENCHES) and latest.exists():  # a selection keeps the others' figures
        kept = {k: v for k, v in json.loads(latest.read_text()).items() if k not in results}
    RESULTS.mkdir(exist_ok=True)
    latest.write_text(json.dumps({**results, **kept, **measured}, indent=2) + "\n")
    shown = {**results, **measured}
    width = max(len(k) for k in shown)
    for key, value in shown.items():
        print(f"{key:<{width}}  {value}")
    print(f"\nwritten to {latest}")


def parse_args() -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(BENCHES))
    names: list[str] = parser.parse_args().names
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        parser.error(f"no bench named {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    return [n for n in BENCHES if n in names] if names else list(BENCHES)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
