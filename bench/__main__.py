"""`make bench`: Beamline's figures next to baselines measured in the same run.

Prints a table and writes bench/results/latest.json. Sized for a 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from beamline import bus, streams
from beamline.runtime import Mesh, RuntimeOptions
from beamline.settings import MeshSettings
from beamline.testing import NatsServer, free_port
from bench import e2e, recorder

RESULTS = Path(__file__).parent / "results"
E2E_TASKS = int(os.environ.get("BENCH_E2E_TASKS", "3000"))
RECORDER_ROWS = int(os.environ.get("BENCH_RECORDER_ROWS", "100000"))


async def bench_e2e(work: Path) -> dict[str, Any]:
    config, script = e2e.write_inputs(work)
    settings = MeshSettings(data_dir=work / "mesh", config=config)
    options = RuntimeOptions(
        nats_port=free_port(),
        monitor_port=free_port(),
        fakellm_port=free_port(),
        fakellm_script=script,
        extra_env={"BEAMLINE_LOG_LEVEL": "WARNING"},
    )
    mesh = Mesh(settings, options)
    await mesh.start()
    try:
        nc = await bus.connect(mesh.nats_url, "bench")
        try:
            await e2e.e2e_tasks_per_s(nc, 200)  # warm up: imports, connections, caches
            result = await e2e.e2e_tasks_per_s(nc, E2E_TASKS)
            result.update(await e2e.raw_js_consume_per_s(nc, E2E_TASKS * 10))
            fakellm = f"http://127.0.0.1:{options.fakellm_port}"
            result.update(await e2e.raw_http_per_s(fakellm, min(E2E_TASKS, 2000)))
        finally:
            await nc.close()
    finally:
        mesh.stop()
    result["e2e_ratio_vs_raw"] = round(
        result["e2e_tasks_per_s"] / result["raw_js_consume_per_s"], 4
    )
    result["e2e_target"] = ">= 1/16 = 0.0625 of raw"
    result["e2e_ratio_vs_raw_http"] = round(result["e2e_tasks_per_s"] / result["raw_http_per_s"], 3)
    return result


async def bench_recorder(work: Path) -> dict[str, Any]:
    server = NatsServer(port=free_port(), store=work / "nats", log_dir=work / "logs")
    server.start()
    try:
        nc = await bus.connect(server.url, "bench")
        try:
            await streams.ensure_streams(nc.jetstream(), MeshSettings().mailbox_shards)
            payloads = [bus.encode(recorder.event(i)) for i in range(RECORDER_ROWS)]
            result = await recorder.recorder_rows_per_s(nc, server.url, work, RECORDER_ROWS)
            result.update(await recorder.raw_js_receive_per_s(nc, RECORDER_ROWS))
        finally:
            await nc.close()
    finally:
        server.kill()
    result.update(await asyncio.to_thread(recorder.raw_insert_rows_per_s, work, payloads))
    result["recorder_ratio_vs_raw"] = round(
        result["recorder_rows_per_s"] / result["raw_insert_rows_per_s"], 3
    )
    result["recorder_target"] = ">= 0.70 of raw"
    result["recorder_ratio_vs_raw_receive"] = round(
        result["recorder_rows_per_s"] / result["raw_js_receive_per_s"], 3
    )
    return result


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="beamline-bench-"))
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    try:
        results.update(await bench_e2e(work / "e2e"))
        (work / "recorder").mkdir()
        results.update(await bench_recorder(work / "recorder"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    print(f"\nwritten to {RESULTS / 'latest.json'}")


if __name__ == "__main__":
    asyncio.run(main())
