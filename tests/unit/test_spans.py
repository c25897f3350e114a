"""beamline.spans: recorded rows into otel_traces rows, pure (no ClickHouse here)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from beamline import bus, rows, spans
from beamline.envelope import (
    ChatMessage,
    Envelope,
    ErrorPayload,
    EventPayload,
    Kind,
    LLMResponsePayload,
    ReplyPayload,
    TaskPayload,
    ToolResultPayload,
    Usage,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
T0_NS = int(T0.timestamp()) * 1_000_000_000 + 123_456_000
COL = {name: i for i, name in enumerate(spans.COLUMNS)}


def row(env: Envelope, stream: str = "BL_JOURNAL", seq: int = 1) -> list[Any]:
    return rows.envelope_row(
        bus.encode(env),
        subject="bl.x",
        stream=stream,
        stream_seq=seq,
        max_message_bytes=10**6,
        stream_ts_ns=0,
    )


def col(span: list[Any], name: str) -> Any:
    return span[COL[name]]


def conversation() -> tuple[Envelope, Envelope, Envelope, Envelope]:
    task = Envelope(
        kind=Kind.TASK,
        sender="user",
        recipient="role:analysis",
        conversation_id="conv-1",
        parent_span_id="a" * 16,
        payload=TaskPayload(prompt="what does it cost?"),
        ts=T0,
    )
    llm = task.child(
        LLMResponsePayload(
            request_id="req-1",
            provider="fakellm",
            model="m1",
            message=ChatMessage(role="assistant", content="calling"),
            finish_reason="tool_calls",
            latency_ms=250.5,
            attempts=2,
        ),
        sender="gateway.fakellm",
        recipient="analyst",
        usage=Usage(input_tokens=120, output_tokens=7),
        ts=T0 + timedelta(seconds=1),
    )
    tool = llm.child(
        ToolResultPayload(call_id="call-1", name="calculator", result="0.5", duration_ms=1.25),
        sender="tool.calculator",
        recipient="analyst",
        ts=T0 + timedelta(seconds=1, milliseconds=10),
    )
    reply = task.child(
        ReplyPayload(task_id=task.id, text="0.5"),
        sender="analyst",
        recipient="user",
        ts=T0 + timedelta(seconds=3),
    )
    return task, llm, tool, reply


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
