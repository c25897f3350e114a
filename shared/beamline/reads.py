"""Typed reads of `bl_messages`: every message of a conversation or of a trace, in time
order, read with FINAL so that a row stored twice before a merge counts once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from clickhouse_connect.driver.client import Client

from beamline.rows import MESSAGES_TABLE


@dataclass(frozen=True, slots=True)
class MessageRow:
    id: str
    kind: str
    subject: str
    sender: str
    recipient: str
    conversation_id: str
    step: int
    trace_id: str
    span_id: str
    parent_span_id: str
    ts: datetime
    input_tokens: int
    output_tokens: int
    reason: str
    payload: str
    stream: str
    stream_seq: int
    recorded_at: datetime

    def payload_json(self) -> Any:
        """The payload parsed (a raw row's payload may not be JSON: then the text)."""
        try:
            return orjson.loads(self.payload)
        except orjson.JSONDecodeError:
            return self.payload


MESSAGE_FIELDS: Final = tuple(f.name for f in fields(MessageRow))
_SELECT_MESSAGES = f"SELECT {', '.join(MESSAGE_FIELDS)} FROM {MESSAGES_TABLE} FINAL"
CONVERSATION_SQL: Final = (
    f"{_SELECT_MESSAGES} WHERE conversation_id = {{conversation_id:String}}"
    " ORDER BY ts, step, id LIMIT {limit:UInt32}"
)
TRACE_SQL: Final = (
    f"{_SELECT_MESSAGES} WHERE trace_id = {{trace_id:String}}"
    " ORDER BY ts, id LIMIT {limit:UInt32}"
)


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        dt = datetime.fromisoformat(value)
        return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
    raise TypeError(f"not a timestamp: {value!r}")


def rows_from_result(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[MessageRow]:
    """Typed rows from a result with MESSAGE_FIELDS columns, from a client or a
    `bl.query.sql` answer (where timestamps arrive as ISO 8601 text)."""
    rows = list(rows)
    if not rows:  # an empty Native result may come without column names
        return []
    index = {name: i for i, name in enumerate(columns)}
    missing = [f for f in MESSAGE_FIELDS if f not in index]
    if missing:
        raise ValueError(f"result lacks columns {missing}")
    out: list[MessageRow] = []
    for r in rows:
        v = {f: r[index[f]] for f in MESSAGE_FIELDS}
        v["ts"] = _as_datetime(v["ts"])
        v["recorded_at"] = _as_datetime(v["recorded_at"])
        out.append(MessageRow(**v))
    return out


def conversation_rows(
    client: Client, conversation_id: str, limit: int = 10_000
) -> list[MessageRow]:
    """Every message of one conversation, in time order."""
    result = client.query(
        CONVERSATION_SQL, parameters={"conversation_id": conversation_id, "limit": limit}
    )
    return rows_from_result(result.column_names, result.result_rows)


def trace_rows(client: Client, trace_id: str, limit: int = 10_000) -> list[MessageRow]:
    """Every message of one trace, in time order."""
    result = client.query(TRACE_SQL, parameters={"trace_id": trace_id, "limit": limit})
    return rows_from_result(result.column_names, result.result_rows)
