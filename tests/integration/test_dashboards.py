"""Every panel of every dashboard in dashboards/*.json, run against a recorded demo run: the
SQL expanded as the Grafana ClickHouse plugin expands it, through the recorder's read-only
query endpoint, must return rows with the columns its panel format needs.

The run: the demo team and a failing provider on a real mesh, plus a supervisor's decisions
published as the supervisor service publishes them (event envelopes on
bl.events.supervisor.<event>), all recorded by the real recorder into bl_messages and
otel_traces."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from beamline import bus, client, grafana, nats_auth, query, subjects
from beamline.envelope import Envelope, EventPayload, Kind
from beamline.testing import wait_for

from .conftest import ROOT, MeshFactory, MeshHandle

DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
# the values the template variables take; conversation and trace_id come from the run
VARIABLES = {
    "agent": "researcher",
    "provider": "fakellm",
    "supervisor": "analysis",
    "status": "Unset",
    "min_duration_ms": "0",
}
CRASH = "RuntimeError: search index gone"

# the research team plus an agent whose provider answers 429, then 500 twice (no retries),
# which records llm_call_failed events and opens that provider's breaker (two 5xx)
CONFIG = """
version: 1
tools_modules: [beamline.demo_tools]
providers:
  fakellm: {kind: openai, base_url: "${BEAMLINE_FAKELLM_URL}/v1", api_key_env: FAKELLM_API_KEY}
  fakellm-anthropic: {kind: anthropic, base_url: "${BEAMLINE_FAKELLM_URL}/v1",
                      api_key_env: FAKELLM_API_KEY}
  flaky: {kind: openai, base_url: "${BEAMLINE_FAKELLM_URL}/v1", api_key_env: FAKELLM_API_KEY,
          max_attempts: 1, breaker_fail_max: 2, breaker_reset_s: 60, context_window: 128000}
agents:
  - {name: researcher, role: research, system_prompt: "You are the team's researcher.",
     models: [{provider: fakellm, model: gpt-4o-mini}], tools: [search_notes]}
  - {name: analyst, role: analysis, system_prompt: "You are the team's analyst.",
     models: [{provider: fakellm, model: gpt-4o-mini}], tools: [calculator]}
  - {name: writer, role: writing, system_prompt: "You are the team's writer.",
     models: [{provider: fakellm-anthropic, model: claude-sonnet-4-5}]}
  - {name: flake, role: flaky, system_prompt: "You are flake.",
     models: [{provider: flaky, model: flaky-model}]}
"""
FLAKY_RULES = """
  - {name: rate-limited, match: {model: flaky-model, contains: "429"}, fault: {status: 429}}
  - {name: server-error, match: {model: flaky-model, contains: "500"}, fault: {status: 500}}
"""


def dashboards() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, json.loads(path.read_text())) for path in DASHBOARDS]


def decision(
    name: str, about: str, data: dict[str, Any], cause: Envelope | None = None
) -> Envelope:
    """A supervisor event as the supervisor publishes it: sender supervisor, recipient the
    child (or host) it is about, conversation the supervisor's name, caused by `cause`."""
    payload = EventPayload(name=name, data=data)
    if cause is not None:
        return cause.child(payload, sender="supervisor", recipient=about)
    return Envelope(
        kind=Kind.EVENT,
        sender="supervisor",
        recipient=about,
        conversation_id=str(data.get("supervisor", "supervisor")),
        payload=payload,
    )


def supervision_story() -> list[Envelope]:
    """analysis restarts researcher once, gives up at its next crash (intensity 1 in 5 s) and
    escalates to team; a host is lost and its agent re-homed; team stops and removes writer;
    a standby supervisor is elected."""
    child = {"supervisor": "analysis", "child": "researcher"}
    crash = {**child, "exit": CRASH}
    limit = {"intensity": 1, "period": 5}
    started = decision("child_started", "researcher", {**child, "host": "host-a"})
    crashed = decision("child_exited", "researcher", {**crash, "host": "host-a"}, started)
    restarted = decision(
        "child_restarted",
        "researcher",
        {**crash, "reason": "permanent", "restarts": 1, **limit,
         "terminate": ["researcher"], "start": ["researcher"]},
        crashed,
    )  # fmt: skip
    again = decision("child_exited", "researcher", {**crash, "host": "host-a"}, restarted)
    gave_up = decision("supervisor_gave_up", "researcher", {**crash, "restarts": 2, **limit}, again)
    escalated = decision("escalated", "team", {"supervisor": "analysis", "parent": "team"}, gave_up)
    lost = decision("host_lost", "host-b", {"host": "host-b", "agents": ["analyst"], "shards": [3]})
    rehomed = decision(
        "agent_rehomed",
        "analyst",
        {"supervisor": "analysis", "agent": "analyst", "from_host": "host-b", "to_host": "host-a"},
        lost,
    )
    batch = decision(  # a host with many agents: one event per batch, not per agent
        "children_rehomed",
        "analysis",
        {"supervisor": "analysis", "child": "analysis", "host": "host-a", "from_host": "host-b",
         "n": 120, "children": ["worker-1", "worker-2"]},
        lost,
    )  # fmt: skip
    writer = {"supervisor": "team", "child": "writer"}
    stopped = decision("child_stopped", "writer", {**writer, "host": "host-a"})
    removed = decision(
        "child_removed", "writer", {**writer, "exit": "shutdown", "reason": "temporary"}, stopped
    )
    elected = decision("leader_elected", "sup-2", {"instance": "sup-2"})
    return [started, crashed, restarted, again, gave_up, escalated, lost, rehomed, batch,
            stopped, removed, elected]  # fmt: skip


async def publish_supervision(mesh: MeshHandle) -> int:
    """The story, published as the supervisor's NATS user: only it may publish there."""
    nc = await mesh.connect_as(nats_auth.Role.SUPERVISOR, "test-supervisor")
    story = supervision_story()
    try:
        for env in story:
            subject = subjects.event("supervisor", env.payload.name)  # type: ignore[union-attr]
            await bus.publish(nc.jetstream(), subject, env)
    finally:
        await nc.close()
    return len(story)


async def record_a_demo_run(
    start_mesh: MeshFactory, tmp_path: Path
) -> tuple[MeshHandle, dict[str, str]]:
    demo = (ROOT / "infra/examples/fakellm-demo.yaml").read_text()
    (tmp_path / "script.yaml").write_text(demo.replace("rules:\n", "rules:" + FLAKY_RULES, 1))
    (tmp_path / "team.yaml").write_text(CONFIG)
    mesh = await start_mesh(
        config=tmp_path / "team.yaml",
        script=tmp_path / "script.yaml",
        env={"BEAMLINE_AGENT_TRANSIENT_RETRIES": "0"},
    )
    tasks = [("research", "what about restarts?"), ("analysis", "what does it cost?")]
    tasks += [("writing", "describe Beamline"), ("flaky", "429 please"), ("flaky", "500 now")]
    conversations = {}
    for role, prompt in tasks:
        conversations[role] = await client.submit(mesh.nc, subjects.task(role), prompt)
        await client.await_reply(mesh.nc, conversations[role], timeout=30)
    # the second failure opens flaky's breaker: its only provider, so the agent pauses with
    # the task in hand (no reply until a trial call succeeds)
    await client.submit(mesh.nc, subjects.task("flaky"), "500 again")
    await mesh.js.publish("bl.task.research", b'{"prompt": "unterminated')  # a dead letter
    decisions = await publish_supervision(mesh)

    async def all_recorded() -> bool:
        result = await query.query(
            mesh.nc,
            "SELECT countIf(kind = 'dead_letter'), countIf(kind = 'reply'), "
            "countIf(kind = 'error'), countIf(subject LIKE '%breaker_opened'), "
            "countIf(subject LIKE '%agent_paused'), "
            "(SELECT uniqExact(SpanId) FROM otel_traces WHERE ServiceName = 'beamline-supervisor') "
            "FROM bl_messages FINAL",
        )
        dead, replies, errors, breaker, paused, decision_spans = result.rows[0]
        return bool(
            dead >= 1 and replies >= 3 and errors >= 2 and breaker >= 1 and paused >= 1
            and decision_spans >= decisions
        )  # fmt: skip

    await wait_for(all_recorded, timeout=20, what="the demo run recorded")
    research = conversations["research"]
    (trace_id,) = (
        await query.query(
            mesh.nc,
            "SELECT any(trace_id) FROM bl_messages WHERE conversation_id = {c:String}",
            {"c": research},
        )
    ).rows[0]
    return mesh, {**VARIABLES, "conversation": research, "trace_id": trace_id}


async def test_every_panel_of_every_dashboard_returns_what_its_format_needs(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    boards = {"overview", "agent", "llm", "supervision", "traces"}
    assert {name for name, _ in dashboards()} == {f"{b}.json" for b in boards}
    mesh, variables = await record_a_demo_run(start_mesh, tmp_path)
    now = int(time.time())
    window = grafana.Window(from_s=now - 3600, to_s=now + 60, interval_s=10)

    async def check(panel: dict[str, Any], target: dict[str, Any]) -> list[str]:
        sql = grafana.expand(target["rawSql"], window, variables)
        try:
            result = await query.query(mesh.nc, sql)
        except Exception as exc:
            return [f"query failed: {exc}"]
        return grafana.check_result(panel, target, result.columns, result.types, result.rows)

    problems: dict[str, list[str]] = {}
    checked = 0
    for name, board in dashboards():
        for variable in board["templating"]["list"]:
            if variable["type"] != "query":
                continue  # a text box or a fixed list: its value is in `variables`
            result = await query.query(mesh.nc, grafana.expand(variable["query"], window, {}))
            if variables[variable["name"]] not in [row[0] for row in result.rows]:
                problems[f"{name} variable {variable['name']}"] = [f"values {result.rows}"]
        for panel, target in grafana.queries(board):
            checked += 1
            found = await check(panel, target)
            if found:
                problems[f"{name} / {panel['title']}"] = found
    assert not problems, json.dumps(problems, indent=2)
    assert checked >= 33

    # a re-homing is shown whether it came one agent at a time or as one batch
    board = dict(dashboards())["supervision.json"]
    rehomed = next(t for p, t in grafana.queries(board) if p["title"] == "Re-homed agents")
    result = await query.query(mesh.nc, grafana.expand(rehomed["rawSql"], window, variables))
    moved = {(row[1], row[2], row[4]) for row in result.rows}
    assert moved == {("analyst", 1, "host-a"), ("worker-1, worker-2", 120, "host-a")}, moved

    # and the same check fails a panel that names a column its table does not have
    panel = {"title": "broken", "targets": [], "transformations": []}
    for column, table, ts in [("cost_usd", "bl_messages", "ts"), ("SpanAttrs", "otel_traces", "Timestamp")]:  # fmt: skip
        broken = {
            "format": grafana.FORMAT_TIME_SERIES,
            "queryType": "timeseries",
            "rawSql": f"SELECT $__timeInterval({ts}) AS time, count({column}) AS n FROM {table} "
            f"WHERE $__timeFilter({ts}) GROUP BY time ORDER BY time",
        }
        found = await check(panel, broken)
        assert found and column in found[0], found
