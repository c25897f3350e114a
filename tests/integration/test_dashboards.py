"""Every panel of every dashboard in dashboards/*.json, run against a recorded demo run: the
SQL expanded as the Grafana ClickHouse plugin expands it, through the recorder's read-only
query endpoint, must return rows with the columns its panel format needs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from beamline import client, grafana, query, subjects
from beamline.testing import wait_for

from .conftest import ROOT, MeshFactory

DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
VARIABLES = {"agent": "researcher", "provider": "fakellm"}

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
          max_attempts: 1, breaker_fail_max: 2, breaker_reset_s: 60}
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


async def record_a_demo_run(start_mesh: MeshFactory, tmp_path: Path) -> Any:
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
    tasks += [("flaky", "500 again")]
    for role, prompt in tasks:
        conversation = await client.submit(mesh.nc, subjects.task(role), prompt)
        await client.await_reply(mesh.nc, conversation, timeout=30)
    await mesh.js.publish("bl.task.research", b'{"prompt": "unterminated')  # a dead letter

    async def all_recorded() -> bool:
        result = await query.query(
            mesh.nc,
            "SELECT countIf(kind = 'dead_letter'), countIf(kind = 'reply'), "
            "countIf(kind = 'error'), countIf(subject LIKE '%breaker_opened') "
            "FROM bl_messages FINAL",
        )
        dead, replies, errors, breaker = result.rows[0]
        return bool(dead >= 1 and replies >= 3 and errors >= 3 and breaker >= 1)

    await wait_for(all_recorded, timeout=20, what="the demo run recorded")
    return mesh


async def test_every_panel_of_every_dashboard_returns_what_its_format_needs(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    assert {name for name, _ in dashboards()} >= {"overview.json", "agent.json", "llm.json"}
    mesh = await record_a_demo_run(start_mesh, tmp_path)
    now = int(time.time())
    window = grafana.Window(from_s=now - 3600, to_s=now + 60, interval_s=10)

    async def check(panel: dict[str, Any], target: dict[str, Any]) -> list[str]:
        sql = grafana.expand(target["rawSql"], window, VARIABLES)
        try:
            result = await query.query(mesh.nc, sql)
        except Exception as exc:
            return [f"query failed: {exc}"]
        return grafana.check_result(panel, target, result.columns, result.types, result.rows)

    problems: dict[str, list[str]] = {}
    checked = 0
    for name, board in dashboards():
        for variable in board["templating"]["list"]:
            result = await query.query(mesh.nc, grafana.expand(variable["query"], window, {}))
            if VARIABLES[variable["name"]] not in [row[0] for row in result.rows]:
                problems[f"{name} variable {variable['name']}"] = [f"values {result.rows}"]
        for panel, target in grafana.queries(board):
            checked += 1
            found = await check(panel, target)
            if found:
                problems[f"{name} / {panel['title']}"] = found
    assert not problems, json.dumps(problems, indent=2)
    assert checked >= 15

    # and the same check fails a panel that names a column bl_messages does not have
    panel = {"title": "broken", "targets": [], "transformations": []}
    broken = {
        "format": grafana.FORMAT_TIME_SERIES,
        "queryType": "timeseries",
        "rawSql": "SELECT $__timeInterval(ts) AS time, sum(cost_usd) AS cost FROM bl_messages "
        "WHERE $__timeFilter(ts) GROUP BY time ORDER BY time",
    }
    found = await check(panel, broken)
    assert found and "cost_usd" in found[0], found
