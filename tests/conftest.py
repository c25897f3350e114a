"""Fixtures: a real nats-server per test, real service processes, all cleaned up."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from beamline import bus, streams
from beamline.settings import MeshSettings
from beamline.testing import NatsServer, free_port


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(port=free_port(), store=tmp_path / "nats", log_dir=tmp_path / "logs")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await bus.connect(nats_server.url, "test")
    await streams.ensure_streams(client.jetstream(), MeshSettings().mailbox_shards)
    try:
        yield client
    finally:
        await client.close()
