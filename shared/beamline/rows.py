"""The `bl_messages` rows the recorder writes: built from stream messages, inserted
de-duplicated, and looked up by id.

Counting rows: `bl_messages` is a ReplacingMergeTree keyed by (ts, id). An envelope
republished as a new stream message can leave two physical rows until a merge. Count with
`FROM bl_messages FINAL` or `uniqExact(id)`, and read lists with FINAL (`beamline.reads`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
from clickhouse_connect.driver.client import Client

from beamline import ids, subjects
from beamline.bus import parse_traceparent
from beamline.envelope import Kind
from beamline.errors import Reason

MESSAGES_TABLE: Final = "bl_messages"
KIND_RAW: Final = "raw"  # a message that is not a valid envelope, recorded as received

# What the recorder writes, in order (recorded_at is filled by its DEFAULT). The types
# are given to every insert, so clickhouse-connect does not DESCRIBE the table each time.
COLUMNS: Final = (
    "id",
    "kind",
    "subject",
    "sender",
    "recipient",
    "conversation_id",
    "step",
    "trace_id",
    "span_id",
    "parent_span_id",
    "ts",
    "input_tokens",
    "output_tokens",
    "reason",
    "payload",
    "stream",
    "stream_seq",
)
COLUMN_TYPES: Final = (
    "String",
    "LowCardinality(String)",
    "String",
    "String",
    "String",
    "String",
    "UInt32",
    "String",
    "String",
    "String",
    "DateTime64(6, 'UTC')",
    "UInt32",
    "UInt32",
    "LowCardinality(String)",
    "String",
    "LowCardinality(String)",
    "UInt64",
)
_COL = {name: i for i, name in enumerate(COLUMNS)}
ID, KIND, REASON, TS = _COL["id"], _COL["kind"], _COL["reason"], _COL["ts"]

_KINDS: Final = frozenset(k.value for k in Kind)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_TS_US: Final = 10_413_792_000_000_000  # 2300-01-01, past the DateTime64 range
_U32: Final = 0xFFFFFFFF
_US = timedelta(microseconds=1)


def _ts_us(value: Any) -> int:
    if not isinstance(value, str):
        raise TypeError("ts")
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    us = (dt - _EPOCH) // _US
    if not 0 <= us < _MAX_TS_US:
        raise ValueError("ts out of range")
    return us


def _str(value: Any, what: str, max_len: int = 1024) -> str:
    if type(value) is not str or len(value) > max_len:
        raise TypeError(what)
    return value


def _u32(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= _U32:
        raise ValueError("not a UInt32")
    return value


def jetstream_ts_us(ts_ns: int) -> int:
    """Microseconds of a JetStream timestamp, rounded as nats-py does for `msg.metadata`
    (a float division): the agent intake stamps the envelope of a plain task with that
    value, and its raw row must get the same ts to share the (ts, id) key."""
    return (datetime.fromtimestamp(ts_ns / 1_000_000_000.0, UTC) - _EPOCH) // _US


def raw_row(
    data: bytes,
    reason: str,
    *,
    subject: str,
    stream: str,
    stream_seq: int,
    max_message_bytes: int,
    stream_ts_ns: int | None = None,
    stream_ts_us: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> list[Any]:
    """A row for a message that is not a valid envelope: kind `raw`, the id
    `derived_id(stream, seq)` (the id the agent intake gives the task it makes of it), the
    stream's timestamp, the (truncated) text as payload, and the trace from `traceparent`.
    The timestamp: `stream_ts_ns` as JetStream gives it (rounded like nats-py, see
    `jetstream_ts_us`), or `stream_ts_us` taken as is."""
    if stream_ts_ns is not None:
        ts = jetstream_ts_us(stream_ts_ns)
    elif stream_ts_us is not None:
        ts = stream_ts_us
    else:
        raise TypeError("raw_row needs stream_ts_ns or stream_ts_us")
    trace_id, parent = "", ""
    if headers:
        tp = parse_traceparent(headers.get(subjects.H_TRACEPARENT))
        if tp:
            trace_id, parent = tp
    return [
        ids.derived_id(stream, str(stream_seq)),
        KIND_RAW,
        subject,
        "",
        "",
        "",
        0,
        trace_id,
        "",
        parent,
        ts,
        0,
        0,
        reason,
        data[:max_message_bytes].decode("utf-8", "replace"),
        stream,
        stream_seq,
    ]


def envelope_row(
    data: bytes,
    *,
    subject: str,
    stream: str,
    stream_seq: int,
    max_message_bytes: int,
    stream_ts_ns: int | None = None,
    stream_ts_us: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> list[Any]:
    """One `bl_messages` row (in COLUMNS order) from a message as stored in a stream.

    The hot path of the recorder: orjson and a structural check of the envelope fields, not
    a pydantic validation (publishers validated it; the payload body is stored as JSON text
    without being checked). Nothing is lost: what is not an envelope becomes a `raw` row
    with reason `oversized`, `not_json` or `invalid_schema`.
    """
    if len(data) > max_message_bytes:
        reason = Reason.OVERSIZED.value
    else:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            reason = Reason.NOT_JSON.value
        else:
            try:
                return _row(obj, subject, stream, stream_seq, headers)
            except (KeyError, TypeError, ValueError, OverflowError):
                reason = Reason.INVALID_SCHEMA.value
    return raw_row(
        data,
        reason,
        subject=subject,
        stream=stream,
        stream_seq=stream_seq,
        stream_ts_ns=stream_ts_ns,
        stream_ts_us=stream_ts_us,
        max_message_bytes=max_message_bytes,
        headers=headers,
    )


def _row(
    obj: Any, subject: str, stream: str, stream_seq: int, headers: Mapping[str, str] | None
) -> list[Any]:
    if type(obj) is not dict:
        raise TypeError("not an object")
    payload = obj["payload"]
    if type(payload) is not dict:
        raise TypeError("payload")
    kind = obj.get("kind") or payload.get("kind")
    if kind not in _KINDS or payload.get("kind") != kind:
        raise ValueError("kind")
    env_id = _str(obj["id"], "id", 128)
    if not env_id:
        raise ValueError("id")
    trace_id = _str(obj["trace_id"], "trace_id", 32)
    span_id = _str(obj["span_id"], "span_id", 16)
    if len(trace_id) != 32 or len(span_id) != 16:
        raise ValueError("trace/span id")
    parent = obj.get("parent_span_id") or ""
    if parent and (type(parent) is not str or len(parent) != 16):
        raise ValueError("parent_span_id")
    usage = obj.get("usage")
    if usage is None:
        input_tokens = output_tokens = 0
    elif type(usage) is dict:
        input_tokens = _u32(usage.get("input_tokens", 0))
        output_tokens = _u32(usage.get("output_tokens", 0))
    else:
        raise TypeError("usage")
    if kind == "error" or kind == "dead_letter":
        reason = payload.get("reason")
    elif kind == "tool_result":
        reason = payload.get("error_reason")
    else:
        reason = headers.get(subjects.H_REASON) if headers else None
    return [
        env_id,
        kind,
        subject,
        _str(obj["sender"], "sender"),
        _str(obj["recipient"], "recipient"),
        _str(obj["conversation_id"], "conversation_id"),
        _u32(obj.get("step", 0)),
        trace_id,
        span_id,
        parent,
        _ts_us(obj["ts"]),
        input_tokens,
        output_tokens,
        reason if type(reason) is str else "",
        orjson.dumps(payload).decode(),
        stream,
        stream_seq,
    ]


def poison_row(row: Sequence[Any], max_message_bytes: int) -> list[Any]:
    """A stand-in for a row ClickHouse refuses: kind `raw`, reason `poison`, strings only."""
    text = orjson.dumps(dict(zip(COLUMNS, row, strict=True)), default=str)
    return [
        str(row[ID]),
        KIND_RAW,
        str(row[_COL["subject"]]),
        "",
        "",
        "",
        0,
        "",
        "",
        "",
        row[TS] if type(row[TS]) is int and 0 <= row[TS] < _MAX_TS_US else 0,
        0,
        0,
        Reason.POISON.value,
        text[:max_message_bytes].decode("utf-8", "replace"),
        str(row[_COL["stream"]]),
        row[_COL["stream_seq"]] if type(row[_COL["stream_seq"]]) is int else 0,
    ]


def dedup_token(row_ids: Iterable[str]) -> str:
    """The insert de-duplication token of a batch: sha256 of its ordered ids."""
    h = hashlib.sha256()
    for row_id in row_ids:
        h.update(row_id.encode())
        h.update(b"\n")
    return h.hexdigest()


def insert_rows(client: Client, rows: Sequence[Sequence[Any]], token: str | None = None) -> int:
    """Insert rows (COLUMNS order) into bl_messages, column-oriented, de-duplicated by
    `token` (default: the sha256 of the ordered ids). Returns the rows sent."""
    if not rows:
        return 0
    columns = [list(col) for col in zip(*rows, strict=True)]
    client.insert(
        MESSAGES_TABLE,
        columns,
        column_names=COLUMNS,
        column_type_names=COLUMN_TYPES,
        column_oriented=True,
        settings={"insert_deduplication_token": token or dedup_token(r[ID] for r in rows)},
    )
    return len(rows)


def stored_ids(client: Client, candidate_ids: Sequence[str]) -> dict[str, bool]:
    """Which of these ids bl_messages already holds (one parameterized query), each with
    True when an envelope row is stored for it, False when only a raw row is."""
    if not candidate_ids:
        return {}
    result = client.query(
        f"SELECT id, max(kind != 'raw') FROM {MESSAGES_TABLE}"
        " WHERE id IN {ids:Array(String)} GROUP BY id",
        parameters={"ids": list(candidate_ids)},
    )
    return {str(r[0]): bool(r[1]) for r in result.result_rows}
