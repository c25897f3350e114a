"""A whole embedded mesh for integration tests: nats-server, fakellm, recorder (chDB),
gateway and agent host as real processes on free 127.0.0.1 ports, torn down even on failure."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from beamline import bus, nats_auth, nats_credentials
from beamline.process import Process
from beamline.runtime import Mesh, RuntimeOptions
from beamline.settings import MeshSettings
from beamline.testing import (
    NatsServer,
    containers,
    free_port,
    mesh_env,
    pick_test_backend,
    start_service,
)

ROOT = Path(__file__).resolve().parents[2]
TEAM = ROOT / "infra/examples/research-team.yaml"
DEMO_SCRIPT = ROOT / "infra/examples/fakellm-demo.yaml"
API_KEY = "sk-test-SENTINEL-9f3b"  # given to every test mesh; must never show up anywhere


class MeshHandle:
    """The running mesh plus what tests need to poke it."""

    def __init__(self, mesh: Mesh, nc: NATS, fakellm_url: str) -> None:
        self.mesh, self.nc, self.fakellm_url = mesh, nc, fakellm_url

    @property
    def js(self) -> Any:
        return self.nc.jetstream()

    async def fakellm_calls(self) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as client:
            calls: list[dict[str, Any]] = (
                await client.get(f"{self.fakellm_url}/_fakellm/calls")
            ).json()
            return calls

    def logs(self, name: str) -> str:
        return self.mesh.process(name).logs()

    async def events(self, subject: str) -> list[dict[str, Any]]:
        """Every event on `subject` (wildcards allowed) so far, oldest first, as
        {event, **data}, read from BL_EVENTS."""
        sub = await self.js.subscribe(
            subject,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        out: list[dict[str, Any]] = []
        try:
            while True:
                msg = await sub.next_msg(timeout=0.3)
                payload = json.loads(msg.data)["payload"]
                out.append({"event": payload["name"], **payload["data"]})
        except nats.errors.TimeoutError:
            return out
        finally:
            await sub.unsubscribe()

    async def cli(self, *argv: str) -> tuple[int, str]:
        """`beamline ARGV...` as an operator on this mesh: (exit code, stdout and stderr)."""
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "beamline"),
            *argv,
            env={**os.environ, **self.mesh.env()},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
        return proc.returncode or 0, out.decode()

    async def connect_as(self, role: nats_auth.Role, name: str) -> NATS:
        """A connection as one service role's NATS user (e.g. the only one that may publish
        supervisor events or control commands); the caller closes it."""
        users = nats_credentials.MeshCredentials.load(
            self.mesh.settings.data_dir / nats_auth.CREDENTIALS_FILE
        )
        credentials = users.for_user(role) if users else None
        return await bus.connect(self.mesh.nats_url, name, credentials=credentials)


MeshFactory = Callable[..., Any]
LOG_TAIL_CHARS = 3000


BACKEND = pick_test_backend()
needs_local_nats = pytest.mark.skipif(
    BACKEND != "local", reason="restarts the nats-server process, which a container hides"
)


@pytest.fixture
async def start_mesh(tmp_path: Path) -> AsyncIterator[MeshFactory]:
    """Start a mesh: on the local binaries (nats-server, chDB), or, where a Docker engine
    runs, on a NATS and a ClickHouse server in containers (testcontainers) — same tests."""
    meshes: list[tuple[Mesh, NATS]] = []
    stack = ExitStack()

    async def start(
        config: Path = TEAM,
        script: Path = DEMO_SCRIPT,
        env: dict[str, str] | None = None,
    ) -> MeshHandle:
        data_dir = tmp_path / f"mesh{len(meshes)}"
        external_nats, clickhouse_url = None, ""
        if BACKEND == "docker":
            external_nats, clickhouse_url = stack.enter_context(containers())
        settings = MeshSettings(
            data_dir=data_dir,
            config=config,
            nats_url="nats://unused:1",
            clickhouse_url=clickhouse_url,
        )
        options = RuntimeOptions(
            external_nats_url=external_nats,
            nats_port=free_port(),
            monitor_port=free_port(),
            fakellm_port=free_port(),
            fakellm_script=script,
            stop_timeout_s=10,
            extra_env={"FAKELLM_API_KEY": API_KEY, **(env or {})},
        )
        mesh = Mesh(settings, options)
        try:
            await mesh.start()
        except BaseException:
            mesh.stop()
            raise
        nc = await bus.connect(mesh.nats_url, "test")
        meshes.append((mesh, nc))
        return MeshHandle(mesh, nc, f"http://127.0.0.1:{options.fakellm_port}")

    try:
        yield start
    finally:
        for mesh, nc in meshes:
            await nc.close()
            mesh.stop()
            # shown by pytest for a failed test only: what each service said last
            for proc in mesh.processes:
                print(f"--- {proc.name} log (tail) ---\n{proc.logs()[-LOG_TAIL_CHARS:]}")
        stack.close()


# --- one recorder process at a time, on the per-test nats-server (tests/conftest.py) ------

# short timers so redelivery and retry paths finish within a test
FAST_RECORDER = {
    "BEAMLINE_RECORDER_FLUSH_INTERVAL_MS": "50",
    "BEAMLINE_RECORDER_ACK_WAIT_S": "2",
    "BEAMLINE_RECORDER_BACKOFF_INITIAL_S": "0.05",
    "BEAMLINE_RECORDER_BACKOFF_MAX_S": "0.5",
    "BEAMLINE_RECORDER_PULL_EXPIRES_S": "2",
}

StartRecorder = Callable[..., Process]


@pytest.fixture
def recorder(nats_server: NatsServer, tmp_path: Path) -> Iterator[StartRecorder]:
    """Start recorder processes with extra env; all are killed (logs printed) at the end."""
    procs: list[Process] = []

    def start(**env: str) -> Process:
        full = mesh_env(nats_server.url, tmp_path / "data", **FAST_RECORDER)
        full.update(env)
        proc = start_service("recorder", full, tmp_path / "logs", suffix=f"-{len(procs)}")
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            print(f"--- {proc.name} log (tail) ---\n{proc.logs()[-4000:]}")
