"""A recorded conversation to turn into spans: shared by the span and OTLP export tests."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from beamline import bus, rows, spans
from beamline.envelope import (
    ChatMessage,
    Envelope,
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


def row(
    env: Envelope, stream: str = "BL_JOURNAL", seq: int = 1, subject: str = "bl.x"
) -> list[Any]:
    return rows.envelope_row(
        bus.encode(env),
        subject=subject,
        stream=stream,
        stream_seq=seq,
        max_message_bytes=10**6,
        stream_ts_ns=0,
    )


def col(span: Sequence[Any], name: str) -> Any:
    return span[COL[name]]


def conversation() -> tuple[Envelope, Envelope, Envelope, Envelope]:
    """A task (with a caller's parent span), an LLM call, its tool call, the reply."""
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
