"""Where benches run: a whole embedded mesh (`local_mesh`), or a nats-server of the
bench's own (no users, 127.0.0.1) with Beamline's streams (`local_nats`). Both are
stopped on the way out, whatever happened."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from nats.aio.client import Client as NATS

from beamline import bus, streams
from beamline.runtime import Mesh, RuntimeOptions
from beamline.settings import MeshSettings
from beamline.testing import NatsServer, free_port


@asynccontextmanager
async def local_nats(work: Path) -> AsyncIterator[tuple[NatsServer, NATS]]:
    server = NatsServer(port=free_port(), store=work / "nats", log_dir=work / "logs")
    server.start()
    try:
        nc = await bus.connect(server.url, "bench")
        try:
            await streams.ensure_streams(nc.jetstream(), MeshSettings().mailbox_shards)
            yield server, nc
        finally:
            await nc.close()
    finally:
        server.kill()


@asynccontextmanager
async def local_mesh(
    work: Path,
    config: Path,
    script: Path,
    env: dict[str, str] | None = None,
    guards: bool = True,
) -> AsyncIterator[tuple[Mesh, NATS]]:
    """The embedded mesh on free ports, with `config` and a fakellm playing `script`;
    without the guard services if not `guards`."""
    options = RuntimeOptions(
        guards=guards,
        nats_port=free_port(),
        monitor_port=free_port(),
        fakellm_port=free_port(),
        fakellm_script=script,
        extra_env={"BEAMLINE_LOG_LEVEL": "WARNING", **(env or {})},
    )
    mesh = Mesh(MeshSettings(data_dir=work / "mesh", config=config), options)
    await mesh.start()
    try:
        nc = await bus.connect(mesh.nats_url, "bench")
        try:
            yield mesh, nc
        finally:
            await nc.close()
    finally:
        mesh.stop()


def write_inputs(work: Path, name: str, config: str, script: str) -> tuple[Path, Path]:
    """A bench's deployment file and fakellm script in `work`: (config, script)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / f"{name}.yaml").write_text(config)
    (work / "script.yaml").write_text(script)
    return work / f"{name}.yaml", work / "script.yaml"
