"""Provider failover end to end: real nats-server, gateway, agent host and recorder (chDB)
processes, and two fakellm providers over real HTTP. What each fakellm received and what
the recorder stored are the evidence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from beamline import client, ops, query, subjects
from beamline.process import Process
from beamline.testing import free_port, start_service, wait_for

from .conftest import MeshFactory, MeshHandle

pytestmark = pytest.mark.timeout(120)

TWO_PROVIDERS = """
version: 1
providers:
  primary: {kind: openai, base_url: "${BEAMLINE_FAKELLM_URL}/v1", max_attempts: 1,
            breaker_fail_max: 2, breaker_reset_s: 6, context_window: 128000}
  backup: {kind: openai, base_url: "${BACKUP_URL}/v1", max_attempts: 1, context_window: 128000}
agents:
  - {name: switcher, role: switch,
     models: [{provider: primary, model: m-primary}, {provider: backup, model: m-backup}]}
"""
ONE_PROVIDER = """
version: 1
providers:
  solo: {kind: openai, base_url: "${BEAMLINE_FAKELLM_URL}/v1", max_attempts: 1,
         breaker_fail_max: 1, breaker_reset_s: 1, context_window: 128000}
agents:
  - {name: loner, role: lone, models: [{provider: solo, model: m-solo}]}
"""
# the same agent in a process of its own: it consumes its mailbox itself, and must keep its
# held messages from redelivery as a host does
ISOLATED_ONE_PROVIDER = (
    ONE_PROVIDER.replace("m-solo}]}", "m-solo}], isolation: process}")
    + "supervisors:\n  - {name: root, strategy: one_for_one, children: [{agent: loner}]}\n"
)
DOWN = "rules:\n  - {name: down, match: {}, fault: {status: %d}}\ndefault: {text: unused}\n"
HEALED = "default: {text: '%s: {last_user}'}\n"
FAST_RETRIES = {"BEAMLINE_AGENT_RETRY_BASE_S": "0.05", "BEAMLINE_AGENT_RETRY_CAP_S": "0.1"}


class Fake:
    """One fakellm process, seen from the test: its calls, its script."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def calls(self) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as http:
            found: list[dict[str, Any]] = (await http.get(f"{self.url}/_fakellm/calls")).json()
            return found

    async def said(self) -> list[str]:
        """The last user message of every call it answered with 200, in order."""
        return [
            next(m["content"] for m in reversed(c["body"]["messages"]) if m["role"] == "user")
            for c in await self.calls()
            if c["status"] == 200
        ]

    async def script(self, text: str) -> None:
        async with httpx.AsyncClient() as http:
            (await http.put(f"{self.url}/_fakellm/script", content=text)).raise_for_status()


@pytest.fixture
def backup(tmp_path: Path) -> Any:
    port = free_port()
    (tmp_path / "backup.yaml").write_text(HEALED % "backup")
    env = {
        "BEAMLINE_FAKELLM_HOST": "127.0.0.1",
        "BEAMLINE_FAKELLM_PORT": str(port),
        "BEAMLINE_FAKELLM_SCRIPT": str(tmp_path / "backup.yaml"),
    }
    process: Process = start_service("fakellm", env, tmp_path / "logs", suffix="-backup")
    try:
        yield Fake(f"http://127.0.0.1:{port}")
    finally:
        process.stop(5)


async def agent_health(mesh: MeshHandle) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(
        (await mesh.nc.request(subjects.health("agent"), b"", timeout=2)).data
    )
    return body


async def agent_row(mesh: MeshHandle, name: str) -> dict[str, Any]:
    rows = (await agent_health(mesh))["agents"]
    return next(r for r in rows if r["agent"] == name)


async def recorded_events(mesh: MeshHandle, names: set[str]) -> list[dict[str, Any]]:
    result = await query.query(
        mesh.nc,
        "SELECT subject, payload FROM bl_messages FINAL WHERE kind = 'event' "
        "AND startsWith(subject, 'bl.events.') ORDER BY ts, id",
        {},
    )
    out = []
    for subject, payload in result.rows:
        name = subject.rsplit(".", 1)[-1]
        if name in names:
            out.append({"name": name, **json.loads(payload)["data"]})
    return out


async def two_providers(
    start_mesh: MeshFactory, tmp_path: Path, backup: Fake, config: str, script: str
) -> tuple[MeshHandle, Fake]:
    """A mesh whose own fakellm is `primary` (with `script`) and `backup` the other one."""
    (tmp_path / "two.yaml").write_text(config)
    (tmp_path / "primary.yaml").write_text(script)
    mesh = await start_mesh(
        config=tmp_path / "two.yaml",
        script=tmp_path / "primary.yaml",
        env={"BACKUP_URL": backup.url, **FAST_RETRIES},
    )
    return mesh, Fake(mesh.fakellm_url)


async def ask(mesh: MeshHandle, agent: str, prompt: str) -> str:
    conversation = await client.submit(mesh.nc, subjects.inbox(agent), prompt)
    reply = await client.await_reply(mesh.nc, conversation, timeout=60)
    assert reply.kind.value == "reply", reply
    return client.reply_text(reply)


async def test_an_open_breaker_moves_traffic_to_the_second_provider_and_back_when_it_closes(
    start_mesh: MeshFactory, tmp_path: Path, backup: Fake
) -> None:
    mesh, primary = await two_providers(start_mesh, tmp_path, backup, TWO_PROVIDERS, DOWN % 500)

    # two 500s (the agent's retry is the second) open primary's breaker; the call moves on
    assert await ask(mesh, "switcher", "first") == "backup: first"
    assert [c["status"] for c in await primary.calls()] == [500, 500]
    assert await ask(mesh, "switcher", "second") == "backup: second"  # straight to backup
    assert len(await primary.calls()) == 2
    row = await agent_row(mesh, "switcher")
    assert row["provider"] == "backup" and row["breakers"]["primary"] == "open"

    # a host started after the breaker opened reads its state from BL_BREAKERS at once:
    # it never saw the transition, yet it does not call primary
    await mesh.mesh.respawn("agent")
    await wait_for(lambda: _breaker_is(mesh, "primary", "open"), what="the new host knows")
    assert await ask(mesh, "switcher", "after restart") == "backup: after restart"
    assert len(await primary.calls()) == 2
    assert await backup.said() == ["first", "second", "after restart"]

    # primary recovers; after its reset timeout the gateway half-opens it and the agent's
    # next call is the trial, which closes it: the agent is back on its preferred provider
    await primary.script(HEALED % "primary")
    await wait_for(
        lambda: _breaker_is(mesh, "primary", "half_open"), timeout=15, what="primary half-open"
    )
    assert await ask(mesh, "switcher", "third") == "primary: third"
    assert await primary.said() == ["third"]
    assert len(await backup.calls()) == 3
    await wait_for(lambda: _breaker_is(mesh, "primary", "closed"), what="primary closed")
    assert (await agent_row(mesh, "switcher"))["provider"] == "primary"

    wanted = {"breaker_opened", "breaker_half_opened", "breaker_closed"}
    wanted |= {"agent_failed_over", "agent_failed_back"}

    async def all_recorded() -> list[dict[str, Any]]:
        found = await recorded_events(mesh, wanted)
        return found if len(found) >= 6 else []

    events = await wait_for(all_recorded, timeout=30, what="the six decisions recorded")
    assert [e["name"] for e in events] == [
        "breaker_opened",
        "agent_failed_over",
        "agent_failed_over",  # the restarted host's agent decides afresh
        "breaker_half_opened",
        "breaker_closed",  # its call was the trial
        "agent_failed_back",  # reported once that call succeeded
    ]
    over = events[1]
    assert over["agent"] == "switcher" and over["provider"] == "backup"
    assert over["from"] == "primary" and "HTTP 500" in over["reason"]
    back = events[5]
    assert back["provider"] == "primary" and back["from"] == "backup"
    assert "half_open" in back["reason"]


async def _breaker_is(mesh: MeshHandle, provider: str, state: str) -> bool:
    health = await agent_health(mesh)
    return bool(health["breakers"].get(provider) == state)


# no retry to burn, and any redelivery would be dead-lettered as poison: a pause must need
# neither. It outlasts ack_wait, so only the mailbox keep-alive holds the messages.
PAUSE_ENV = {
    "BEAMLINE_AGENT_TRANSIENT_RETRIES": "0",
    "BEAMLINE_AGENT_MAX_DELIVERIES": "1",
    "BEAMLINE_AGENT_ACK_WAIT_S": "2",
    "BEAMLINE_AGENT_BREAKER_RECHECK_S": "1",
}


async def solo_down(
    start_mesh: MeshFactory, tmp_path: Path, config: str, prompts: list[str]
) -> tuple[MeshHandle, Fake, list[str]]:
    """A mesh whose agent `loner` has one provider, `solo`, answering 503; `prompts` sent to
    it. The mesh, solo's fake, and the prompts' conversations."""
    (tmp_path / "one.yaml").write_text(config)
    (tmp_path / "solo.yaml").write_text(DOWN % 503)
    mesh = await start_mesh(
        config=tmp_path / "one.yaml", script=tmp_path / "solo.yaml", env=PAUSE_ENV
    )
    conversations = [await client.submit(mesh.nc, subjects.inbox("loner"), p) for p in prompts]
    return mesh, Fake(mesh.fakellm_url), conversations


async def paused_loner(mesh: MeshHandle) -> dict[str, Any] | None:
    row = await agent_row(mesh, "loner")
    return row if row["state"] == "paused" else None


async def replies_once_healed(mesh: MeshHandle, solo: Fake, conversations: list[str]) -> list[str]:
    """solo healed: the text of each conversation's reply, in order."""
    await solo.script(HEALED % "solo")
    texts = []
    for conversation in conversations:
        reply = await client.await_reply(mesh.nc, conversation, timeout=30)
        assert reply.kind.value == "reply", reply
        texts.append(client.reply_text(reply))
    return texts


async def test_a_single_provider_agent_is_paused_and_resumes_with_no_message_lost(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    prompts = [f"message {i}" for i in range(1, 5)]
    mesh, solo, conversations = await solo_down(start_mesh, tmp_path, ONE_PROVIDER, prompts)

    row = await wait_for(lambda: paused_loner(mesh), timeout=20, what="loner paused")
    assert row["paused_on"] == "solo" and row["mailbox_depth"] == 4
    assert row["breakers"] == {"solo": "open"}
    ps = await ops.admin(mesh.nc, "ps")
    assert [r["state"] for r in ps if r["agent"] == "loner"] == ["paused"]
    assert "paused:solo" in ops.render_ps(ps)

    # it stays paused across half-open trials that fail, longer than ack_wait, and the
    # provider sees only the trials (one call per reset timeout), not a retry storm
    await wait_for(lambda: _calls_at_least(solo, 4), timeout=20, what="three failed trials")
    assert all(c["status"] == 503 for c in await solo.calls())
    assert len(await solo.calls()) <= 6
    assert (await agent_row(mesh, "loner"))["state"] == "paused"

    texts = await replies_once_healed(mesh, solo, conversations)
    assert texts == [f"solo: {p}" for p in prompts]
    assert await solo.said() == prompts  # answered in the order sent, each once
    info = await mesh.js.stream_info(subjects.STREAM_DLQ)
    assert info.state.messages == 0  # nothing dead-lettered
    assert (await agent_row(mesh, "loner"))["state"] == "idle"

    async def recorded() -> list[dict[str, Any]]:
        found = await recorded_events(mesh, {"agent_paused", "agent_resumed"})
        return found if len(found) >= 2 else []

    paused_event, resumed_event = await wait_for(recorded, timeout=30, what="pause recorded")
    assert paused_event["name"] == "agent_paused" and resumed_event["name"] == "agent_resumed"
    assert paused_event["agent"] == "loner" and paused_event["provider"] == "solo"
    assert "HTTP 503" in paused_event["reason"]
    assert resumed_event["provider"] == "solo" and resumed_event["paused_s"] > 2


async def test_an_isolated_agent_paused_longer_than_ack_wait_loses_no_message(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    prompts = [f"message {i}" for i in range(1, 4)]
    mesh, solo, conversations = await solo_down(
        start_mesh, tmp_path, ISOLATED_ONE_PROVIDER, prompts
    )

    row = await wait_for(
        lambda: paused_loner(mesh), timeout=30, what="loner paused in its own process"
    )
    assert row["isolation"] == "process" and row["pid"]
    # paused through three times ack_wait: only the keep-alive holds its messages
    await wait_for(lambda: _calls_at_least(solo, 6), timeout=30, what="failed trials for 6 s")

    texts = await replies_once_healed(mesh, solo, conversations)
    assert texts == [f"solo: {p}" for p in prompts]
    assert (await mesh.js.stream_info(subjects.STREAM_DLQ)).state.messages == 0


async def _calls_at_least(fake: Fake, n: int) -> bool:
    return len(await fake.calls()) >= n


async def test_a_rate_limited_provider_throttles_the_agent_without_failover_or_crash(
    start_mesh: MeshFactory, tmp_path: Path, backup: Fake
) -> None:
    config = TWO_PROVIDERS.replace(
        "max_attempts: 1,\n            breaker_fail_max: 2",
        "max_attempts: 3,\n            breaker_fail_max: 1",
    )
    throttle = (
        "rules:\n  - {name: slow-down, match: {}, fault: {status: 429, retry_after_s: 0.5}, "
        "times: 2}\ndefault: {text: 'primary: {last_user}'}\n"
    )
    mesh, primary = await two_providers(start_mesh, tmp_path, backup, config, throttle)
    assert await ask(mesh, "switcher", "patience") == "primary: patience"
    calls = await primary.calls()
    assert [c["status"] for c in calls] == [429, 429, 200]
    assert calls[2]["ts"] - calls[0]["ts"] >= 0.95  # each Retry-After was waited out
    assert await backup.calls() == []  # throttling is no reason to fail over
    row = await agent_row(mesh, "switcher")
    assert row["breakers"]["primary"] == "closed" and row["failed"] == 0
    assert mesh.mesh.process("agent").alive()
