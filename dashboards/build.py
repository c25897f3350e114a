"""Generate the Grafana dashboards in this directory: `python dashboards/build.py`.

The committed JSON is what Grafana loads; tests/unit/test_grafana_dashboards.py checks it
equals this generator's output, and tests/integration/test_dashboards.py runs every panel's
SQL against a recorded run. SQL uses the ClickHouse plugin's macros and `${agent}` /
`${provider}` template variables (see shared/beamline/grafana.py for how they expand).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "grafana-clickhouse-datasource", "uid": "beamline-clickhouse"}
TIME_SERIES, TABLE = 0, 1  # the plugin's `format` (sqlutil.FormatQueryOption)

# the agent that owns a journal subject `bl.journal.<agent>.<conversation>`
JOURNAL_AGENT = "splitByChar('.', subject)[3]"
EVENT = "bl.events.gateway."


def timeseries(title: str, sql: str, unit: str = "short", desc: str = "") -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": desc,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [target(sql, TIME_SERIES)],
    }


def table(
    title: str, sql: str, columns: list[str], kind: str = "table", desc: str = ""
) -> dict[str, Any]:
    return {
        "type": kind,
        "title": title,
        "description": desc,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {},
        "targets": [target(sql, TABLE)],
        # declares the panel's columns (and their order): the test holds the SQL to it
        "transformations": [
            {
                "id": "organize",
                "options": {"indexByName": {c: i for i, c in enumerate(columns)}},
            }
        ],
    }


def target(sql: str, fmt: int) -> dict[str, Any]:
    return {
        "datasource": DS,
        "editorType": "sql",
        "format": fmt,
        "queryType": "timeseries" if fmt == TIME_SERIES else "table",
        "rawSql": " ".join(sql.split()),
        "refId": "A",
    }


def variable(name: str, sql: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DS,
        "query": " ".join(sql.split()),
        "definition": " ".join(sql.split()),
        "refresh": 2,
        "sort": 1,
        "multi": False,
        "includeAll": False,
        "current": {},
        "options": [],
    }


def dashboard(
    uid: str, title: str, panels: list[dict[str, Any]], variables: list[dict[str, Any]]
) -> dict[str, Any]:
    laid_out = []
    for i, panel in enumerate(panels):
        wide = panel["type"] == "table"
        width = 24 if wide else 12
        laid_out.append(
            {
                "id": i + 1,
                "datasource": DS,
                "gridPos": {"h": 8, "w": width, "x": 0 if wide else (i % 2) * 12, "y": i * 8},
                **panel,
            }
        )
    return {
        "uid": uid,
        "title": title,
        "tags": ["beamline"],
        "timezone": "utc",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["beamline"], "asDropdown": True, "title": "Beamline"}
        ],
        "panels": laid_out,
    }


def overview() -> dict[str, Any]:
    return dashboard(
        "beamline-overview",
        "Beamline / Overview",
        [
            timeseries(
                "Tasks per second",
                """SELECT $__timeInterval(ts) AS time, count() / $__interval_s AS tasks_per_s
                FROM bl_messages FINAL WHERE $__timeFilter(ts) AND kind = 'task'
                GROUP BY time ORDER BY time""",
                unit="reqps",
                desc="Task envelopes recorded (to roles and to agents' inboxes), per second.",
            ),
            table(
                "Active agents",
                f"""SELECT uniqExact({JOURNAL_AGENT}) AS active_agents
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND startsWith(subject, 'bl.journal.')""",
                ["active_agents"],
                kind="stat",
                desc="Agents that journaled any step in the time range.",
            ),
            timeseries(
                "Messages by kind",
                """SELECT $__timeInterval(ts) AS time, kind, count() AS messages
                FROM bl_messages FINAL WHERE $__timeFilter(ts)
                GROUP BY time, kind ORDER BY time""",
            ),
            timeseries(
                "Errors by reason",
                """SELECT $__timeInterval(ts) AS time, reason, count() AS errors
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts)
                  AND (kind = 'error' OR (kind = 'tool_result' AND reason != ''))
                GROUP BY time, reason ORDER BY time""",
                desc="Error replies and failed tool calls, by reason.",
            ),
            table(
                "Dead letters by reason",
                """SELECT reason, count() AS dead_letters, max(ts) AS last_seen
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'dead_letter'
                GROUP BY reason ORDER BY dead_letters DESC""",
                ["reason", "dead_letters", "last_seen"],
            ),
            timeseries(
                "Tokens",
                """SELECT $__timeInterval(ts) AS time, sum(input_tokens) AS input_tokens,
                       sum(output_tokens) AS output_tokens
                FROM bl_messages FINAL WHERE $__timeFilter(ts) AND kind = 'llm_response'
                GROUP BY time ORDER BY time""",
            ),
            timeseries(
                "Circuit breaker transitions",
                f"""SELECT $__timeInterval(ts) AS time,
                       concat(JSONExtractString(payload, 'data', 'provider'), ' ',
                              replaceOne(subject, '{EVENT}', '')) AS transition,
                       count() AS transitions
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'event'
                  AND startsWith(subject, '{EVENT}breaker_')
                GROUP BY time, transition ORDER BY time""",
                desc="breaker_opened / breaker_half_opened / breaker_closed events, per provider.",
            ),
        ],
        [],
    )


AGENT_ROWS = """$__timeFilter(ts) AND (sender = '${agent}' OR recipient = '${agent}'
    OR subject LIKE 'bl.journal.${agent}.%')"""


def agent() -> dict[str, Any]:
    return dashboard(
        "beamline-agent",
        "Beamline / Agent",
        [
            timeseries(
                "Messages by kind",
                f"""SELECT $__timeInterval(ts) AS time, kind, count() AS messages
                FROM bl_messages FINAL WHERE {AGENT_ROWS}
                GROUP BY time, kind ORDER BY time""",
            ),
            timeseries(
                "Tokens",
                """SELECT $__timeInterval(ts) AS time, sum(input_tokens) AS input_tokens,
                       sum(output_tokens) AS output_tokens
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'llm_response' AND recipient = '${agent}'
                GROUP BY time ORDER BY time""",
            ),
            table(
                "Conversations and steps",
                """SELECT conversation_id, min(ts) AS started, max(ts) AS last_message,
                       max(step) AS steps, countIf(kind = 'llm_response') AS llm_calls,
                       countIf(kind = 'tool_result') AS tool_calls,
                       sum(input_tokens + output_tokens) AS tokens,
                       anyLastIf(kind, kind IN ('reply', 'error')) AS outcome
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND startsWith(subject, 'bl.journal.${agent}.')
                GROUP BY conversation_id ORDER BY started DESC LIMIT 200""",
                [
                    "conversation_id",
                    "started",
                    "last_message",
                    "steps",
                    "llm_calls",
                    "tool_calls",
                    "tokens",
                    "outcome",
                ],
            ),
            table(
                "Tool calls",
                """SELECT JSONExtractString(payload, 'name') AS tool, count() AS calls,
                       countIf(reason != '') AS failed,
                       round(avg(JSONExtractFloat(payload, 'duration_ms')), 3) AS avg_ms
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'tool_result' AND recipient = '${agent}'
                GROUP BY tool ORDER BY calls DESC""",
                ["tool", "calls", "failed", "avg_ms"],
            ),
            table(
                "Message log",
                f"""SELECT ts, kind, sender, recipient, step, reason, input_tokens,
                       output_tokens, conversation_id, trace_id, substring(payload, 1, 300) AS payload
                FROM bl_messages FINAL WHERE {AGENT_ROWS}
                ORDER BY ts DESC LIMIT 500""",
                [
                    "ts",
                    "kind",
                    "sender",
                    "recipient",
                    "step",
                    "reason",
                    "input_tokens",
                    "output_tokens",
                    "conversation_id",
                    "trace_id",
                    "payload",
                ],
                desc="Newest first. `beamline trace <trace_id or conversation_id>` prints the whole tree.",
            ),
        ],
        [
            variable(
                "agent",
                f"""SELECT DISTINCT {JOURNAL_AGENT} AS agent FROM bl_messages
                WHERE startsWith(subject, 'bl.journal.') ORDER BY agent""",
            )
        ],
    )


LLM_CALLS = (
    f"""kind = 'event' AND subject IN ('{EVENT}llm_call_completed', '{EVENT}llm_call_failed')"""
)


def llm() -> dict[str, Any]:
    return dashboard(
        "beamline-llm",
        "Beamline / LLM",
        [
            timeseries(
                "Calls by model",
                f"""SELECT $__timeInterval(ts) AS time,
                       JSONExtractString(payload, 'data', 'model') AS model, count() AS calls
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND {LLM_CALLS}
                  AND JSONExtractString(payload, 'data', 'provider') = '${{provider}}'
                GROUP BY time, model ORDER BY time""",
                desc="Completed and failed calls of the selected provider (gateway events).",
            ),
            timeseries(
                "Latency percentiles",
                """SELECT $__timeInterval(ts) AS time,
                       quantile(0.5)(JSONExtractFloat(payload, 'latency_ms')) AS p50_ms,
                       quantile(0.95)(JSONExtractFloat(payload, 'latency_ms')) AS p95_ms,
                       quantile(0.99)(JSONExtractFloat(payload, 'latency_ms')) AS p99_ms
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'llm_response'
                  AND JSONExtractString(payload, 'provider') = '${provider}'
                GROUP BY time ORDER BY time""",
                unit="ms",
                desc="Gateway latency of answered calls, retries included.",
            ),
            timeseries(
                "Tokens",
                """SELECT $__timeInterval(ts) AS time, sum(input_tokens) AS input_tokens,
                       sum(output_tokens) AS output_tokens
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'llm_response'
                  AND JSONExtractString(payload, 'provider') = '${provider}'
                GROUP BY time ORDER BY time""",
            ),
            table(
                "Tokens per provider and model",
                """SELECT JSONExtractString(payload, 'provider') AS provider,
                       JSONExtractString(payload, 'model') AS model, count() AS calls,
                       sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
                       round(avg(JSONExtractFloat(payload, 'latency_ms')), 1) AS avg_latency_ms,
                       sum(JSONExtractInt(payload, 'attempts') - 1) AS retries
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'llm_response'
                GROUP BY provider, model ORDER BY input_tokens + output_tokens DESC""",
                [
                    "provider",
                    "model",
                    "calls",
                    "input_tokens",
                    "output_tokens",
                    "avg_latency_ms",
                    "retries",
                ],
                desc="Every provider, whatever the `provider` variable.",
            ),
            timeseries(
                "429 / 5xx / failed calls",
                f"""SELECT $__timeInterval(ts) AS time,
                       countIf(JSONExtractInt(payload, 'data', 'http_status') = 429) AS rate_limited_429,
                       countIf(JSONExtractInt(payload, 'data', 'http_status') >= 500) AS server_error_5xx,
                       count() AS failed_calls
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'event'
                  AND subject = '{EVENT}llm_call_failed'
                GROUP BY time ORDER BY time""",
                desc="llm_call_failed events of every provider (the final status after retries).",
            ),
            table(
                "Failures by provider and reason",
                f"""SELECT JSONExtractString(payload, 'data', 'provider') AS provider,
                       JSONExtractString(payload, 'data', 'model') AS model,
                       JSONExtractString(payload, 'data', 'reason') AS reason,
                       JSONExtractInt(payload, 'data', 'http_status') AS http_status,
                       count() AS failures, max(ts) AS last_seen
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'event'
                  AND subject = '{EVENT}llm_call_failed'
                GROUP BY provider, model, reason, http_status ORDER BY failures DESC""",
                ["provider", "model", "reason", "http_status", "failures", "last_seen"],
            ),
        ],
        [
            variable(
                "provider",
                """SELECT DISTINCT JSONExtractString(payload, 'provider') AS provider
                FROM bl_messages WHERE kind = 'llm_response' ORDER BY provider""",
            )
        ],
    )


DASHBOARDS = {"overview": overview, "agent": agent, "llm": llm}


def render() -> dict[str, str]:
    """file name -> the JSON text Grafana loads."""
    return {
        f"{name}.json": json.dumps(build(), indent=2, ensure_ascii=False) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main() -> int:
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(f"wrote dashboards/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
