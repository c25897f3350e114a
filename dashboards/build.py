"""Generate the Grafana dashboards in this directory: `python dashboards/build.py`.

The committed JSON is what Grafana loads; tests/unit/test_grafana.py checks it equals this
generator's output, and tests/integration/test_dashboards.py runs every panel's SQL against a
recorded run. SQL uses the ClickHouse plugin's macros and template variables (`${agent}`,
`${provider}`, `${supervisor}`, ...); shared/beamline/grafana.py builds the panels and says
how the plugin expands them.

The SQL is written for the tables' sorting keys (infra/clickhouse): bl_messages reads start
with `$__timeFilter(ts)`; otel_traces reads name ServiceName and a SpanName prefix, then
`$__timeFilter(Timestamp)`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from beamline.grafana import (
    custom_variable,
    dashboard,
    query_variable,
    table,
    text_variable,
    timeseries,
    traces,
)

HERE = Path(__file__).resolve().parent

# the agent that owns a journal subject `bl.journal.<agent>.<conversation>`
JOURNAL_AGENT = "splitByChar('.', subject)[3]"
EVENT = "bl.events.gateway."
SUPERVISOR = "bl.events.supervisor."  # subjects.event("supervisor", <event>)


def data(field: str) -> str:
    """A field of an event's `data` (EventPayload), as text."""
    return f"JSONExtractString(payload, 'data', '{field}')"


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
            table(
                "Breaker states",
                f"""SELECT {data("provider")} AS provider,
                       replaceOne(argMax(subject, ts), '{EVENT}breaker_', '') AS state,
                       max(ts) AS since
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'event'
                  AND startsWith(subject, '{EVENT}breaker_')
                GROUP BY provider ORDER BY provider""",
                ["provider", "state", "since"],
                desc="Each provider's last breaker transition in the time range: opened, "
                "half_opened or closed. A provider not listed had no transition in the range. "
                "Breakers live in the gateway's memory: a restarted gateway starts them closed.",
            ),
            timeseries(
                "Restarts",
                f"""SELECT $__timeInterval(ts) AS time, {data("supervisor")} AS supervisor,
                       count() AS restarts
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'event'
                  AND subject = '{SUPERVISOR}child_restarted'
                GROUP BY time, supervisor ORDER BY time""",
                desc="Children restarted, per supervisor (child_restarted events). "
                "Beamline / Supervision has the details.",
            ),
        ],
        [],
    )


AGENT_ROWS = """$__timeFilter(ts) AND (sender = '${agent}' OR recipient = '${agent}'
    OR subject LIKE 'bl.journal.${agent}.%')"""


# A running count: +1 when a task of the agent arrives, -1 when the agent answers it. Its
# tasks: those addressed to it, and those its replies and errors name (`task_id`).
MAILBOX_DEPTH = """
WITH outcomes AS (
    SELECT JSONExtractString(payload, 'task_id') AS task_id, min(ts) AS at
    FROM bl_messages
    WHERE ts >= $__fromTime - INTERVAL 1 DAY AND kind IN ('reply', 'error')
      AND sender = '${agent}'
    GROUP BY task_id HAVING task_id != ''),
tasks AS (
    SELECT id, min(ts) AS at
    FROM bl_messages
    WHERE ts >= $__fromTime - INTERVAL 1 DAY AND ts <= $__toTime AND kind IN ('task', 'raw')
      AND (recipient = '${agent}' OR id IN (SELECT task_id FROM outcomes))
    GROUP BY id)
SELECT time, in_flight, greatest(in_flight - 1, 0) AS mailbox_depth
FROM (
    SELECT time, sum(delta) OVER (ORDER BY time) AS in_flight
    FROM (
        SELECT $__timeInterval(at) AS time, sum(step) AS delta
        FROM (
            SELECT at, 1 AS step FROM tasks
            UNION ALL
            SELECT at, -1 AS step FROM outcomes WHERE task_id IN (SELECT id FROM tasks))
        GROUP BY time))
WHERE time >= $__fromTime
ORDER BY time
"""


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
            timeseries(
                "Mailbox depth",
                MAILBOX_DEPTH,
                steps=True,
                desc="in_flight: tasks the agent has received and not answered yet. "
                "mailbox_depth: those still waiting in its mailbox; an agent works on one "
                "message at a time, so it is in_flight - 1 while it works. From recorded tasks "
                "and the agent's replies and errors (which name their task): a task sent to a "
                "role counts from its arrival once the agent's answer names it, so one still "
                "in progress shows when it ends. Tasks from over a day before the range are "
                "not counted.",
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
            query_variable(
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
            query_variable(
                "provider",
                """SELECT DISTINCT JSONExtractString(payload, 'provider') AS provider
                FROM bl_messages WHERE kind = 'llm_response' ORDER BY provider""",
            )
        ],
    )


def decisions(event: str) -> str:
    """The `event` decisions of the selected supervisor, in the time range."""
    return f"""$__timeFilter(ts) AND kind = 'event' AND subject = '{SUPERVISOR}{event}'
        AND {data("supervisor")} = '${{supervisor}}'"""


def supervision() -> dict[str, Any]:
    return dashboard(
        "beamline-supervision",
        "Beamline / Supervision",
        [
            timeseries(
                "Restarts",
                f"""SELECT $__timeInterval(ts) AS time, {data("child")} AS child,
                       count() AS restarts
                FROM bl_messages FINAL WHERE {decisions("child_restarted")}
                GROUP BY time, child ORDER BY time""",
                desc="Children this supervisor restarted (child_restarted), per child.",
            ),
            timeseries(
                "Intensity reached",
                f"""SELECT $__timeInterval(ts) AS time, count() AS gave_up
                FROM bl_messages FINAL WHERE {decisions("supervisor_gave_up")}
                GROUP BY time ORDER BY time""",
                desc="More restarts than its intensity allows within its period: the "
                "supervisor stopped its children and gave up (supervisor_gave_up).",
            ),
            timeseries(
                "Escalations",
                f"""SELECT $__timeInterval(ts) AS time, {data("parent")} AS parent,
                       count() AS escalations
                FROM bl_messages FINAL WHERE {decisions("escalated")}
                GROUP BY time, parent ORDER BY time""",
                desc="Exits of this supervisor handed to its parent (escalated), per parent.",
            ),
            timeseries(
                "Host losses",
                f"""SELECT $__timeInterval(ts) AS time, {data("host")} AS host,
                       count() AS losses
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'event' AND subject = '{SUPERVISOR}host_lost'
                GROUP BY time, host ORDER BY time""",
                desc="Hosts declared lost (missed heartbeats), per host. Every supervisor: a "
                "host belongs to none of them.",
            ),
            table(
                "Children",
                f"""SELECT {data("child")} AS child,
                       countIf(subject = '{SUPERVISOR}child_restarted') AS restarts,
                       countIf(subject = '{SUPERVISOR}child_exited') AS exits,
                       argMaxIf({data("exit")}, ts, {data("exit")} != '') AS last_exit,
                       argMax(replaceOne(subject, '{SUPERVISOR}', ''), ts) AS last_event,
                       max(ts) AS last_seen
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'event'
                  AND startsWith(subject, '{SUPERVISOR}')
                  AND {data("supervisor")} = '${{supervisor}}' AND child != ''
                GROUP BY child ORDER BY restarts DESC, child""",
                ["child", "restarts", "exits", "last_exit", "last_event", "last_seen"],
                desc="exit: normal, shutdown, shutdown:<term>, or what the crash was.",
            ),
            table(
                "Re-homed agents",
                f"""SELECT ts AS time,
                       if(subject = '{SUPERVISOR}agent_rehomed', {data("agent")},
                          arrayStringConcat(
                              JSONExtract(payload, 'data', 'children', 'Array(String)'), ', '))
                         AS agents,
                       if(subject = '{SUPERVISOR}agent_rehomed', 1,
                          JSONExtractUInt(payload, 'data', 'n')) AS n,
                       {data("from_host")} AS from_host,
                       if(subject = '{SUPERVISOR}agent_rehomed', {data("to_host")},
                          {data("host")}) AS to_host
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'event'
                  AND subject IN ('{SUPERVISOR}agent_rehomed', '{SUPERVISOR}children_rehomed')
                  AND {data("supervisor")} = '${{supervisor}}'
                ORDER BY time DESC LIMIT 200""",
                ["time", "agents", "n", "from_host", "to_host"],
                desc="Agents this supervisor moved to another host: one row per agent "
                "(agent_rehomed), or per batch when a host held many (children_rehomed: n "
                "agents, the first 50 named).",
            ),
            table(
                "Decisions",
                f"""SELECT ts AS time, replaceOne(subject, '{SUPERVISOR}', '') AS event,
                       recipient AS about, {data("exit")} AS exit,
                       {data("reason")} AS reason,
                       substring(JSONExtractRaw(payload, 'data'), 1, 300) AS data,
                       trace_id
                FROM bl_messages FINAL
                WHERE $__timeFilter(ts) AND kind = 'event'
                  AND startsWith(subject, '{SUPERVISOR}')
                  AND {data("supervisor")} IN ('${{supervisor}}', '')
                ORDER BY time DESC LIMIT 500""",
                ["time", "event", "about", "exit", "reason", "data", "trace_id"],
                desc="Newest first: this supervisor's events, and those of no one supervisor "
                "(host_lost, leader_elected). `about`: the child, agent or host. trace_id "
                "opens the decision's span in the trace view.",
            ),
        ],
        [
            query_variable(
                "supervisor",
                f"""SELECT DISTINCT {data("supervisor")} AS supervisor FROM bl_messages
                WHERE $__timeFilter(ts) AND kind = 'event'
                  AND startsWith(subject, '{SUPERVISOR}') AND supervisor != ''
                ORDER BY supervisor""",
            )
        ],
    )


ANY = "*"  # the "All" value of a search filter: the SQL reads it as no filter
TASK_SPANS = f"""ServiceName = 'beamline-agent' AND startsWith(SpanName, 'invoke_agent ')
    AND $__timeFilter(Timestamp)
    AND ('${{agent}}' = '{ANY}' OR SpanAttributes['gen_ai.agent.name'] = '${{agent}}')
    AND ('${{conversation}}' = ''
         OR SpanAttributes['gen_ai.conversation.id'] = '${{conversation}}')
    AND ('${{status}}' = '{ANY}' OR StatusCode = '${{status}}')
    AND Duration >= ${{min_duration_ms}} * 1000000"""

# The plugin's own trace-ID query (what its "View trace" link runs, as ClickHouse's
# observability guide prints it): the lookup table narrows the read to the trace's time range.
TRACE = """
WITH '${trace_id}' AS trace_id,
    (SELECT min(Start) FROM otel_traces_trace_id_ts WHERE TraceId = trace_id) AS trace_start,
    (SELECT max(End) + 1 FROM otel_traces_trace_id_ts WHERE TraceId = trace_id) AS trace_end
SELECT TraceId AS traceID, SpanId AS spanID, ParentSpanId AS parentSpanID,
    ServiceName AS serviceName, SpanName AS operationName, Timestamp AS startTime,
    Duration * 0.000001 AS duration,
    arrayMap(key -> map('key', key, 'value', SpanAttributes[key]), mapKeys(SpanAttributes)) AS tags,
    arrayMap(key -> map('key', key, 'value', ResourceAttributes[key]),
             mapKeys(ResourceAttributes)) AS serviceTags
FROM otel_traces
WHERE traceID = trace_id AND startTime >= trace_start AND startTime <= trace_end
LIMIT 1000
"""


def trace_search() -> dict[str, Any]:
    return dashboard(
        "beamline-traces",
        "Beamline / Traces",
        [
            table(
                "Tasks",
                f"""SELECT Timestamp AS started,
                       SpanAttributes['gen_ai.agent.name'] AS agent,
                       SpanAttributes['gen_ai.conversation.id'] AS conversation_id,
                       StatusCode AS status, round(Duration / 1e6, 1) AS duration_ms,
                       StatusMessage AS error, TraceId AS trace_id
                FROM otel_traces FINAL WHERE {TASK_SPANS}
                ORDER BY started DESC LIMIT 500""",
                [
                    "started",
                    "agent",
                    "conversation_id",
                    "status",
                    "duration_ms",
                    "error",
                    "trace_id",
                ],
                desc="A task's whole life (invoke_agent spans), newest first, filtered by the "
                "variables above. Click a trace_id, View trace: the trace view opens beside it "
                "(or paste it into trace_id for the panel below).",
            ),
            timeseries(
                "Task duration",
                f"""SELECT $__timeInterval(Timestamp) AS time,
                       quantile(0.5)(Duration) / 1e6 AS p50_ms,
                       quantile(0.95)(Duration) / 1e6 AS p95_ms, max(Duration) / 1e6 AS max_ms
                FROM otel_traces FINAL WHERE {TASK_SPANS}
                GROUP BY time ORDER BY time""",
                unit="ms",
                desc="The tasks above, by when they started.",
            ),
            timeseries(
                "Tasks by status",
                f"""SELECT $__timeInterval(Timestamp) AS time, StatusCode AS status,
                       count() AS tasks
                FROM otel_traces FINAL WHERE {TASK_SPANS}
                GROUP BY time, status ORDER BY time""",
                desc="Error: the task ended in an error reply; Unset: answered.",
            ),
            table(
                "Supervisor decisions",
                f"""SELECT Timestamp AS time, replaceOne(SpanName, 'supervise ', '') AS decision,
                       SpanAttributes['beamline.supervisor'] AS supervisor,
                       SpanAttributes['beamline.child'] AS child,
                       SpanAttributes['beamline.exit'] AS exit, StatusCode AS status,
                       TraceId AS trace_id
                FROM otel_traces FINAL
                WHERE ServiceName = 'beamline-supervisor'
                  AND startsWith(SpanName, 'supervise ') AND $__timeFilter(Timestamp)
                  AND ('${{status}}' = '{ANY}' OR StatusCode = '${{status}}')
                ORDER BY time DESC LIMIT 500""",
                ["time", "decision", "supervisor", "child", "exit", "status", "trace_id"],
                desc="supervise <event> spans; status Error: a supervisor gave up, escalated, "
                "or a host was lost.",
            ),
            traces(
                "Trace",
                TRACE,
                desc="The trace whose id is in the trace_id variable, in Grafana's trace view.",
            ),
        ],
        [
            query_variable(
                "agent",
                """SELECT DISTINCT SpanAttributes['gen_ai.agent.name'] AS agent
                FROM otel_traces
                WHERE ServiceName = 'beamline-agent' AND startsWith(SpanName, 'invoke_agent ')
                  AND $__timeFilter(Timestamp)
                ORDER BY agent""",
                any_value=ANY,
            ),
            text_variable("conversation", "", "a conversation id; empty: every conversation"),
            custom_variable(
                "status",
                {"any": ANY, "error": "Error", "no error": "Unset"},
                "the span status: Error, or Unset (no error)",
            ),
            text_variable("min_duration_ms", "0", "only tasks that took at least this long"),
            text_variable("trace_id", "", "the trace shown in the Trace panel"),
        ],
    )


DASHBOARDS = {
    "overview": overview,
    "agent": agent,
    "llm": llm,
    "supervision": supervision,
    "traces": trace_search,
}


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
