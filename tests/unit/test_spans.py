"""beamline.spans: recorded rows into otel_traces rows, pure (no ClickHouse here)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
import pytest

from beamline import bus, rows, spans, subjects
from beamline.envelope import (
    Envelope,
    ErrorPayload,
    EventPayload,
    Kind,
    SummaryPayload,
    ToolResultPayload,
    Usage,
)
from tests.span_samples import T0, T0_NS, col, conversation, row


def by_name(span_rows: list[list[Any]]) -> dict[str, list[Any]]:
    return {col(s, "SpanName"): s for s in span_rows}


def test_rows_match_the_declared_columns_and_only_source_kinds_give_spans() -> None:
    task, llm, tool, reply = conversation()
    event = llm.child(
        EventPayload(name="llm_call_succeeded"), sender="gateway", recipient="bl.events"
    )
    out = spans.span_rows([row(e) for e in (task, llm, tool, event, reply)])
    assert sorted(col(s, "SpanName") for s in out) == [
        "chat m1",
        "execute_tool calculator",
        "invoke_agent analyst",
    ]
    assert len(spans.COLUMNS) == len(spans.COLUMN_TYPES)
    assert all(len(s) == len(spans.COLUMNS) for s in out)
    assert {col(s, "TraceId") for s in out} == {task.trace_id}
    assert spans.span_rows([row(task), row(event)]) == []


def test_chat_span_has_gen_ai_attributes_and_nanosecond_timing() -> None:
    task, llm, _, _ = conversation()
    (span,) = spans.span_rows([row(llm)])
    assert col(span, "SpanId") == llm.span_id
    assert col(span, "ParentSpanId") == task.span_id
    assert col(span, "SpanKind") == "Client"
    assert col(span, "ServiceName") == "beamline-gateway"
    assert col(span, "ResourceAttributes") == {"service.name": "beamline-gateway"}
    assert col(span, "Duration") == 250_500_000  # 250.5 ms in ns
    end_ns = T0_NS + 1_000_000_000
    assert col(span, "Timestamp") == end_ns - 250_500_000
    assert col(span, "StatusCode") == "Unset"
    attrs = col(span, "SpanAttributes")
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "fakellm"
    assert attrs["gen_ai.request.model"] == attrs["gen_ai.response.model"] == "m1"
    assert attrs["gen_ai.usage.input_tokens"] == "120"
    assert attrs["gen_ai.usage.output_tokens"] == "7"
    assert orjson.loads(attrs["gen_ai.response.finish_reasons"]) == ["tool_calls"]
    assert all(type(k) is str and type(v) is str for k, v in attrs.items())


def test_tool_span_is_a_child_of_the_llm_call_and_errors_set_status() -> None:
    _, llm, tool, _ = conversation()
    (span,) = spans.span_rows([row(tool)])
    assert col(span, "SpanName") == "execute_tool calculator"
    assert col(span, "ParentSpanId") == llm.span_id
    assert col(span, "ServiceName") == "beamline-agent"
    assert col(span, "Duration") == 1_250_000
    assert col(span, "Timestamp") == T0_NS + 1_010_000_000 - 1_250_000
    attrs = col(span, "SpanAttributes")
    assert attrs["gen_ai.operation.name"] == "execute_tool"
    assert attrs["gen_ai.tool.name"] == "calculator"
    assert attrs["gen_ai.tool.call.id"] == "call-1"
    assert col(span, "StatusCode") == "Unset" and "error.type" not in attrs

    failed = llm.child(
        ToolResultPayload(
            call_id="call-2", name="ghost", result="no such tool", error_reason="unknown_tool"
        ),
        sender="tool.ghost",
        recipient="analyst",
    )
    (bad,) = spans.span_rows([row(failed)])
    assert col(bad, "StatusCode") == "Error"
    assert col(bad, "StatusMessage") == "no such tool"
    assert col(bad, "SpanAttributes")["error.type"] == "unknown_tool"


def test_invoke_agent_spans_the_task_from_its_start_to_its_outcome() -> None:
    task, llm, tool, reply = conversation()
    span = by_name(spans.span_rows([row(task), row(llm), row(tool), row(reply)]))[
        "invoke_agent analyst"
    ]
    assert col(span, "SpanId") == task.span_id
    assert col(span, "ParentSpanId") == "a" * 16  # the task's own parent
    assert col(span, "Timestamp") == T0_NS
    assert col(span, "Duration") == 3_000_000_000
    assert col(span, "StatusCode") == "Unset"
    attrs = col(span, "SpanAttributes")
    assert attrs["gen_ai.operation.name"] == "invoke_agent"
    assert attrs["gen_ai.agent.name"] == "analyst"
    assert attrs["beamline.task_id"] == task.id


def test_a_task_recorded_in_an_earlier_batch_is_looked_up() -> None:
    task, _, _, reply = conversation()
    plan = spans.plan([row(reply)])
    assert plan.missing_tasks() == [task.id]
    assert plan.may_be_stored(set()) == [task.span_id]  # outcomes come from two streams
    start = spans.TaskStart(rows.envelope_row(bus.encode(task), **_where())[rows.TS], "")
    (span,) = spans.build(plan, {task.id: start})
    assert col(span, "Duration") == 3_000_000_000
    # unknown task: still a span, Duration 0, marked
    (orphan,) = spans.build(spans.plan([row(reply)]))
    assert col(orphan, "Duration") == 0
    assert col(orphan, "SpanAttributes")["beamline.task.start_unknown"] == "true"


def _where() -> dict[str, Any]:
    return {
        "subject": "s",
        "stream": "BL_TASKS",
        "stream_seq": 1,
        "max_message_bytes": 10**6,
        "stream_ts_ns": 0,
    }


def test_a_plain_task_raw_row_gives_the_start_and_the_envelope_wins() -> None:
    task, _, _, reply = conversation()
    raw = rows.raw_row(b'{"prompt": "x"}', "invalid_schema", **_where())
    raw[rows.ID] = task.id
    raw[rows.TS] = 1
    plan = spans.plan([raw, row(task), row(reply)])
    assert plan.missing_tasks() == []
    assert plan.tasks[task.id].ts_us * 1000 == T0_NS


def test_an_error_outcome_ends_the_task_with_error_status() -> None:
    task, _, _, _ = conversation()
    error = task.child(
        ErrorPayload(reason="llm_unavailable", message="all providers down", task_id=task.id),
        sender="analyst",
        recipient="user",
        ts=T0 + timedelta(seconds=2),
    )
    (span,) = [s for s in spans.span_rows([row(task), row(error)])]
    assert col(span, "SpanName") == "invoke_agent analyst"
    assert col(span, "StatusCode") == "Error"
    assert col(span, "StatusMessage") == "llm_unavailable: all providers down"
    assert col(span, "SpanAttributes")["error.type"] == "llm_unavailable"
    assert col(span, "Duration") == 2_000_000_000
    # an error that is not a task's outcome (no task_id) gives no span
    stray = task.child(
        ErrorPayload(reason="llm_unavailable", message="x"), sender="gateway", recipient="a"
    )
    assert spans.span_rows([row(stray)]) == []


def test_ids_are_deterministic_and_duplicates_give_one_span() -> None:
    task, llm, tool, reply = conversation()
    batch = [row(task), row(llm), row(tool), row(reply)]
    first = spans.span_rows(batch)
    again = spans.span_rows([row(e, stream="BL_REPLIES", seq=9) for e in (task, llm, tool, reply)])
    assert first == again
    doubled = spans.span_rows([*batch, row(reply, stream="BL_REPLIES", seq=2)])
    assert len(doubled) == 3
    assert len({col(s, "SpanId") for s in doubled}) == 3
    assert spans.dedup_token(first) == spans.dedup_token(again)
    assert spans.dedup_token(first) != rows.dedup_token(col(s, "SpanId") for s in first)


def test_redelivered_rows_are_checked_and_stored_spans_skipped() -> None:
    task, llm, tool, reply = conversation()
    rs = [row(task), row(llm), row(tool), row(reply)]
    plan = spans.plan(rs)
    redelivered = {rs[1][rows.ID]}
    assert plan.may_be_stored(redelivered) == [llm.span_id, task.span_id]
    plan.without({llm.span_id, task.span_id})
    assert [col(s, "SpanName") for s in spans.build(plan)] == ["execute_tool calculator"]


def test_a_malformed_payload_gives_no_span() -> None:
    _, llm, _, _ = conversation()
    bad = row(llm)
    bad[rows.COLUMNS.index("payload")] = "[1, 2]"
    assert spans.span_rows([bad]) == []
    odd = row(llm)
    odd[rows.COLUMNS.index("payload")] = orjson.dumps({"latency_ms": "slow"}).decode()
    (span,) = spans.span_rows([odd])
    assert col(span, "Duration") == 0 and col(span, "SpanName") == "chat"


# --- supervisor decisions -----------------------------------------------------------------

# every event of the supervisor's contract, with the data it carries
DECISIONS: dict[str, dict[str, Any]] = {
    "child_started": {"supervisor": "analysis", "child": "researcher", "host": "h1"},
    "child_exited": {"supervisor": "analysis", "child": "researcher", "exit": "boom", "host": "h1"},
    "child_restarted": {
        "supervisor": "analysis",
        "child": "researcher",
        "exit": "RuntimeError: boom",
        "reason": "permanent",
        "restarts": 1,
        "intensity": 3,
        "period": 10,
        "terminate": ["researcher", "analyst"],
        "start": ["analyst", "researcher"],
    },
    "child_removed": {"supervisor": "team", "child": "w", "exit": "normal", "reason": "temporary"},
    "child_stopped": {"supervisor": "team", "child": "writer", "host": "h1"},
    "supervisor_gave_up": {
        "supervisor": "analysis",
        "child": "researcher",
        "exit": "RuntimeError: boom",
        "restarts": 4,
        "intensity": 3,
        "period": 10,
    },
    "escalated": {"supervisor": "analysis", "parent": "team"},
    "host_lost": {"host": "h2", "agents": ["analyst"], "shards": [3, 7]},
    "agent_rehomed": {
        "supervisor": "analysis",
        "agent": "analyst",
        "from_host": "h2",
        "to_host": "h1",
    },
    "leader_elected": {"instance": "sup-a"},
}


def decision(event: str, **data: Any) -> Envelope:
    """An event as the supervisor publishes it (sender supervisor, recipient the child)."""
    return Envelope(
        kind=Kind.EVENT,
        sender="supervisor",
        recipient=str(data.get("child") or data.get("agent") or data.get("host") or "team"),
        conversation_id=str(data.get("supervisor", "supervisor")),
        payload=EventPayload(name=event, data=data),
        ts=T0,
    )


def decision_row(env: Envelope) -> list[Any]:
    name = env.payload.name  # type: ignore[union-attr]
    return row(env, stream="BL_EVENTS", subject=subjects.event("supervisor", name))


@pytest.mark.parametrize("event", DECISIONS)
def test_every_supervisor_event_is_an_instant_span_with_its_data_as_attributes(event: str) -> None:
    env = decision(event, **DECISIONS[event])
    (span,) = spans.span_rows([decision_row(env)])
    assert col(span, "SpanName") == f"supervise {event}"
    assert col(span, "ServiceName") == "beamline-supervisor"
    assert col(span, "ResourceAttributes") == {"service.name": "beamline-supervisor"}
    assert col(span, "SpanKind") == "Internal"
    assert (col(span, "TraceId"), col(span, "SpanId")) == (env.trace_id, env.span_id)
    assert col(span, "Timestamp") == T0_NS and col(span, "Duration") == 0
    attrs = col(span, "SpanAttributes")
    assert attrs["beamline.event"] == event and attrs["beamline.envelope_id"] == env.id
    for key, value in DECISIONS[event].items():
        assert attrs[f"beamline.{key}"] == (
            value if isinstance(value, str) else orjson.dumps(value).decode()
        )


def test_a_restart_keeps_its_parent_and_reads_as_otp_reports_it() -> None:
    exited = decision("child_exited", **DECISIONS["child_exited"])
    restarted = exited.child(
        EventPayload(name="child_restarted", data=DECISIONS["child_restarted"]),
        sender="supervisor",
        recipient="researcher",
    )
    (span,) = spans.span_rows([decision_row(restarted)])
    assert col(span, "ParentSpanId") == exited.span_id
    assert col(span, "TraceId") == exited.trace_id
    assert col(span, "StatusCode") == "Unset"  # restarting is the supervisor doing its job
    attrs = col(span, "SpanAttributes")
    assert (attrs["beamline.supervisor"], attrs["beamline.child"]) == ("analysis", "researcher")
    assert attrs["beamline.exit"] == "RuntimeError: boom"
    assert attrs["beamline.restarts"] == "1"
    assert attrs["beamline.terminate"] == '["researcher","analyst"]'


@pytest.mark.parametrize("event", ["supervisor_gave_up", "escalated", "host_lost"])
def test_a_supervision_failure_is_an_error_span(event: str) -> None:
    (span,) = spans.span_rows([decision_row(decision(event, **DECISIONS[event]))])
    assert col(span, "StatusCode") == "Error"
    assert col(span, "SpanAttributes")["error.type"] == event
    assert col(span, "StatusMessage") == DECISIONS[event].get("exit", "")


def test_only_supervisor_events_give_decision_spans() -> None:
    breaker = Envelope(
        kind=Kind.EVENT,
        sender="gateway",
        recipient="events",
        conversation_id="gateway",
        payload=EventPayload(name="breaker_opened", data={"provider": "p"}),
    )
    gateway_row = row(
        breaker, stream="BL_EVENTS", subject=subjects.event("gateway", "breaker_opened")
    )
    restart = decision_row(decision("child_restarted", **DECISIONS["child_restarted"]))
    plan = spans.plan([gateway_row, restart])
    assert plan.sources == [restart]  # a gateway event costs nothing past the plan
    assert spans.span_rows([gateway_row]) == []
    # a redelivered decision is looked up like any other span
    assert plan.may_be_stored({restart[rows.ID]}) == [restart[rows.COLUMNS.index("span_id")]]


def summary_entry(**fields: Any) -> tuple[Envelope, Envelope]:
    task, *_ = conversation()
    summary = SummaryPayload(
        text="read pages 1-3",
        through="entry-9",
        tokens_before=1300,
        tokens_after=700,
        window=1500,
        threshold=0.8,
        **fields,
    )
    entry = task.child(
        summary, sender="gateway.fakellm", recipient="analyst", usage=Usage(input_tokens=900)
    )
    return task, entry


def test_a_summary_written_by_an_llm_call_is_a_chat_span_that_says_what_it_shortened() -> None:
    task, entry = summary_entry(request_id="sum-1", provider="fakellm", model="m1", latency_ms=40.0)
    (span,) = spans.span_rows([row(task), row(entry)])
    assert col(span, "SpanName") == "chat m1" and col(span, "SpanId") == entry.span_id
    assert col(span, "ParentSpanId") == task.span_id
    assert col(span, "Duration") == 40_000_000
    attrs = col(span, "SpanAttributes")
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "fakellm"
    assert attrs["gen_ai.usage.input_tokens"] == "900"
    assert attrs["beamline.context.summary"] == "true"
    assert attrs["beamline.context.tokens_before"] == "1300"
    assert attrs["beamline.context.tokens_after"] == "700"
    assert attrs["beamline.context.window"] == "1500"
    assert attrs["beamline.context.threshold"] == "0.8"
    assert all(type(k) is str and type(v) is str for k, v in attrs.items())


def test_a_fresh_windows_seed_made_without_an_llm_call_gives_no_span() -> None:
    task, entry = summary_entry(fresh_window=True)
    assert spans.span_rows([row(task), row(entry)]) == []
