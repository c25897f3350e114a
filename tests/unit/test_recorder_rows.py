"""envelope_row: envelopes to bl_messages rows, and what is not an envelope to `raw`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from nats.aio.msg import Msg

from beamline import bus, ids, rows
from beamline.envelope import (
    ChatMessage,
    DeadLetterPayload,
    Envelope,
    ErrorPayload,
    EventPayload,
    Kind,
    LLMResponsePayload,
    SummaryPayload,
    TaskPayload,
    ToolResultPayload,
    Usage,
)

STREAM_TS_NS = 1_795_000_000_123_456_789
MAX = 4096


def make_row(data: bytes, headers: dict[str, str] | None = None, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "subject": "bl.task.research",
        "stream": "BL_TASKS",
        "stream_seq": 42,
        "stream_ts_ns": STREAM_TS_NS,
        "max_message_bytes": MAX,
        "headers": headers,
    }
    args.update(kw)
    row = rows.envelope_row(data, **args)
    assert len(row) == len(rows.COLUMNS) == len(rows.COLUMN_TYPES)
    return dict(zip(rows.COLUMNS, row, strict=True))


def task_envelope() -> Envelope:
    return Envelope(
        kind=Kind.TASK,
        sender="a",
        recipient="b",
        conversation_id="c",
        payload=TaskPayload(prompt="p"),
    )


def us(dt: datetime) -> int:
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def test_task_envelope_maps_every_column() -> None:
    env = Envelope(
        kind=Kind.TASK,
        sender="user",
        recipient="role:researcher",
        conversation_id="conv-1",
        step=3,
        payload=TaskPayload(prompt="find papers"),
    )
    r = make_row(bus.encode(env), bus.headers_for(env))
    assert r == {
        "id": env.id,
        "kind": "task",
        "subject": "bl.task.research",
        "sender": "user",
        "recipient": "role:researcher",
        "conversation_id": "conv-1",
        "step": 3,
        "trace_id": env.trace_id,
        "span_id": env.span_id,
        "parent_span_id": "",
        "ts": us(env.ts),
        "input_tokens": 0,
        "output_tokens": 0,
        "reason": "",
        "payload": env.payload.model_dump_json(exclude_none=True),
        "stream": "BL_TASKS",
        "stream_seq": 42,
    }
    assert orjson.loads(r["payload"]) == env.model_dump(mode="json", exclude_none=True)["payload"]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (ErrorPayload(reason="max_steps_exceeded", message="too many"), "max_steps_exceeded"),
        (
            DeadLetterPayload(
                reason="oversized", detail="d", subject="bl.task.x", original="x", original_bytes=1
            ),
            "oversized",
        ),
        (ToolResultPayload(call_id="c", name="search", error_reason="tool_failed"), "tool_failed"),
        (ToolResultPayload(call_id="c", name="search", result="ok"), ""),
        (EventPayload(name="breaker_opened"), ""),
    ],
)
def test_reason_comes_from_error_like_payloads(payload: Any, reason: str) -> None:
    parent = task_envelope()
    env = parent.child(payload, sender="svc", recipient="x")
    r = make_row(bus.encode(env), bus.headers_for(env))
    assert r["kind"] == payload.kind and r["reason"] == reason
    assert r["parent_span_id"] == parent.span_id and r["trace_id"] == parent.trace_id


def test_usage_and_reason_header() -> None:
    env = Envelope(
        kind=Kind.LLM_RESPONSE,
        sender="gateway",
        recipient="agent-1",
        conversation_id="c",
        payload=LLMResponsePayload(
            request_id="r",
            provider="p",
            model="m",
            message=ChatMessage(role="assistant", content="x"),
        ),
        usage=Usage(input_tokens=120, output_tokens=7),
    )
    r = make_row(bus.encode(env), {"Bl-Reason": "rate_limited"})
    assert (r["input_tokens"], r["output_tokens"], r["reason"]) == (120, 7, "rate_limited")


def raw_expectations(r: dict[str, Any], reason: str, seq: int = 42) -> None:
    assert r["kind"] == rows.KIND_RAW == "raw"
    assert r["reason"] == reason
    assert r["id"] == ids.derived_id("BL_TASKS", str(seq))
    assert r["ts"] == rows.jetstream_ts_us(STREAM_TS_NS)
    assert r["stream"] == "BL_TASKS" and r["stream_seq"] == seq


def test_not_json_is_raw_with_its_text() -> None:
    r = make_row(b"hello {not json")
    raw_expectations(r, "not_json")
    assert r["payload"] == "hello {not json"
    # the id is stable for the same place in the stream, different for another place
    assert make_row(b"other")["id"] == r["id"]
    assert make_row(b"x", stream_seq=43)["id"] != r["id"]


def test_invalid_utf8_is_not_json_and_payload_is_valid_text() -> None:
    r = make_row(b'{"id": "\xff\xfe"}')
    raw_expectations(r, "not_json")
    assert "\ufffd" in r["payload"]
    r["payload"].encode()  # never a lone surrogate


def good() -> dict[str, Any]:
    return orjson.loads(bus.encode(task_envelope()))  # type: ignore[no-any-return]


def mutate(**changes: Any) -> bytes:
    obj = good()
    for key, value in changes.items():
        if value is ...:
            obj.pop(key)
        else:
            obj[key] = value
    return orjson.dumps(obj)


@pytest.mark.parametrize(
    "data",
    [
        b'{"hello": "world"}',
        b"[1, 2, 3]",
        b'"just a string"',
        b"null",
        mutate(payload=...),
        mutate(payload="text"),
        mutate(kind="reply"),  # does not match the payload
        mutate(kind="nonsense"),
        mutate(id=...),
        mutate(id=""),
        mutate(id=12),
        mutate(sender=None),
        mutate(conversation_id=["a"]),
        mutate(ts="yesterday"),
        mutate(ts="9999-12-31T00:00:00Z"),  # past the DateTime64 range
        mutate(ts=1700000000),
        mutate(step=-1),
        mutate(step=2**40),
        mutate(step=True),
        mutate(trace_id="abc"),
        mutate(span_id=None),
        mutate(parent_span_id="short"),
        mutate(usage={"input_tokens": -5}),
        mutate(usage="lots"),
    ],
)
def test_wrong_schema_is_raw_invalid_schema(data: bytes) -> None:
    r = make_row(data, {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
    raw_expectations(r, "invalid_schema")
    assert r["payload"] == data.decode()
    assert r["trace_id"] == "ab" * 16 and r["parent_span_id"] == "cd" * 8  # from traceparent


def test_kind_may_be_omitted_and_naive_ts_is_utc() -> None:
    r = make_row(mutate(kind=..., ts="2026-01-02T03:04:05.000006"))
    assert r["kind"] == "task"
    assert r["ts"] == us(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC))


def test_oversized_is_raw_and_truncated() -> None:
    data = mutate(payload={"kind": "task", "prompt": "x" * 10_000})
    r = make_row(data)
    raw_expectations(r, "oversized")
    assert r["payload"] == data[:MAX].decode()


def test_poison_row_is_strings_only_and_keeps_the_id() -> None:
    bad = make_row(bus.encode(task_envelope()))
    values = list(bad.values())
    values[rows.COLUMNS.index("ts")] = "not a time"
    p = dict(zip(rows.COLUMNS, rows.poison_row(values, MAX), strict=True))
    assert p["id"] == bad["id"] and p["kind"] == "raw" and p["reason"] == "poison"
    assert p["ts"] == 0 and p["stream_seq"] == 42
    assert orjson.loads(p["payload"])["ts"] == "not a time"


def test_raw_ts_is_rounded_like_nats_py_metadata() -> None:
    """The intake stamps a plain task's envelope with msg.metadata.timestamp; the raw row
    of the same message must land on the same (ts, id) so that FINAL keeps one of them."""
    for ns in (STREAM_TS_NS, 1_795_000_000_999_999_999, 1_795_000_000_000_000_500, 0):
        reply = f"$JS.ACK.BL_TASKS.dispatch.1.7.7.{ns}.0"
        stamp = Msg(_client=None, reply=reply).metadata.timestamp  # type: ignore[arg-type]
        assert rows.jetstream_ts_us(ns) == us(stamp)
        assert make_row(b"plain", stream_ts_ns=ns)["ts"] == us(stamp)


def test_stream_ts_may_be_given_in_microseconds() -> None:
    assert make_row(b"plain", stream_ts_ns=None, stream_ts_us=123)["ts"] == 123
    with pytest.raises(TypeError, match="stream_ts_ns or stream_ts_us"):
        make_row(b"plain", stream_ts_ns=None)


def test_a_summary_is_recorded_whole_with_its_calls_usage() -> None:
    summary = SummaryPayload(
        text="the gist",
        through="e-7",
        tokens_before=1300,
        tokens_after=640,
        window=1500,
        threshold=0.8,
        request_id="sum-1",
        provider="p",
        model="m",
    )
    env = task_envelope().child(
        summary, sender="gateway", recipient="agent-1", usage=Usage(input_tokens=900)
    )
    r = make_row(bus.encode(env), bus.headers_for(env))
    assert (r["kind"], r["input_tokens"], r["reason"]) == ("summary", 900, "")
    assert orjson.loads(r["payload"]) == summary.model_dump(mode="json", exclude_none=True)
