"""A service does not declare the JetStream layout: it waits a bounded time for `beamline init`
to declare it, then exits naming what is missing.

A real nats-server runs the generated users (the fixtures of test_nats_permissions.py), and
init has not run unless a test runs it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from pydantic import SecretStr

from beamline import bus, nats_auth, streams
from beamline.errors import ConfigError
from beamline.nats_auth import Role
from beamline.nats_credentials import Credentials
from beamline.settings import MeshSettings
from beamline.testing import NatsServer, mesh_env, start_service, wait_for
from tests.integration import test_nats_permissions as permissions

# its fixtures: a nats-server running the generated users, and each user's password
server, passwords = permissions.server, permissions.passwords
ROOT = permissions.ROOT

WAIT_S = 1.0
SERVICE_USERS = [role.value for role in nats_auth.SERVICE_ROLES.values()]


async def connect_as(server: NatsServer, passwords: dict[str, str], user: str) -> NATS:
    who = Credentials(user=user, password=SecretStr(passwords[user]))
    return await bus.connect(server.url, f"test-{user}", who, give_up_s=10)


def log_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("service", SERVICE_USERS)
async def test_a_service_started_before_init_exits_naming_the_missing_stream(
    server: NatsServer, passwords: dict[str, str], tmp_path: Path, service: str
) -> None:
    env = mesh_env(
        server.url,
        tmp_path / "data",
        BEAMLINE_NATS_USER=service,
        BEAMLINE_NATS_PASSWORD=passwords[service],
        BEAMLINE_CONFIG=str(ROOT / "infra/examples/research-team.yaml"),
        BEAMLINE_LAYOUT_WAIT_S=str(WAIT_S),
    )
    proc = start_service(service, env, tmp_path / "logs")
    try:
        # the wait is bounded: the process is gone soon after it (a cold start takes seconds)
        await wait_for(lambda: not proc.alive(), timeout=WAIT_S + 30, what=f"{service} to exit")
    finally:
        proc.kill()
    logs = proc.logs()
    assert proc.popen.returncode == 2, logs  # a configuration error (beamline.service.run)

    waits = [x for x in log_lines(logs) if "waiting for the JetStream layout" in str(x["msg"])]
    assert waits, logs  # it waited for init before giving up
    first_retry, last_retry = (float(str(w["retry_in_s"])) for w in (waits[0], waits[-1]))
    assert first_retry <= WAIT_S and last_retry <= WAIT_S
    uses = nats_auth.USES[Role(service)]
    for stream in uses.streams:
        assert f"stream {stream}" in logs, logs
    for bucket in uses.buckets:
        assert f"bucket {bucket}" in logs, logs
    assert f"not found after waiting {WAIT_S:g} s" in logs
    assert "Run `beamline init`" in logs
    # it only looked the layout up: its user may not declare it, and it did not try
    assert "permissions violation" not in logs.lower(), logs


async def test_a_service_waiting_for_the_layout_goes_on_once_init_declares_it(
    server: NatsServer, passwords: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    agent = await connect_as(server, passwords, "agent")
    init = await connect_as(server, passwords, "init")
    uses = nats_auth.USES[Role.AGENT]
    try:
        with caplog.at_level(logging.WARNING, logger="beamline.streams"):
            waiting = asyncio.ensure_future(streams.require_layout(agent.jetstream(), uses, 30))
            await wait_for(
                lambda: any("waiting for the JetStream" in r.getMessage() for r in caplog.records),
                timeout=10,
                what="the agent to find the layout missing",
            )
            assert not waiting.done()
            await streams.ensure_streams(init.jetstream(), MeshSettings().mailbox_shards)
            await asyncio.wait_for(waiting, timeout=10)  # at its next check (4 s apart at most)
    finally:
        await agent.close()
        await init.close()


async def test_the_wait_ends_with_every_missing_stream_and_bucket_named(
    server: NatsServer, passwords: dict[str, str]
) -> None:
    gateway = await connect_as(server, passwords, "gateway")
    try:
        started = time.monotonic()
        with pytest.raises(ConfigError) as err:
            await streams.require_layout(gateway.jetstream(), nats_auth.USES[Role.GATEWAY], 0.5)
        assert time.monotonic() - started < 0.5 + streams.LAYOUT_LOOKUP_S
    finally:
        await gateway.close()
    assert str(err.value) == (
        "the JetStream layout is not declared: stream BL_EVENTS, stream BL_DLQ, bucket "
        "BL_LLM_RESULTS, bucket BL_BREAKERS not found after waiting 0.5 s. Run `beamline init` against this NATS "
        "server (as the NATS user `init` or `admin`) to declare the streams and buckets; "
        "`make up` runs it as the compose job `init`"
    )
