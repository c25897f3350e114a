"""Reading what the recorder stored. In embedded mode chDB lives inside the recorder process
(one engine per process), so reads are a NATS request to it; with a ClickHouse server
(`BEAMLINE_CLICKHOUSE_URL=http://...`) clients may also read directly."""

from __future__ import annotations

import json
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from pydantic import BaseModel

from beamline import reads, subjects
from beamline.errors import CallerError, Reason, TransientError


class QueryResult(BaseModel):
    columns: list[str]
    types: list[str] = []
    rows: list[list[Any]]

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=False)) for row in self.rows]


async def query(
    nc: NATS, sql: str, parameters: dict[str, Any] | None = None, timeout: float = 15.0
) -> QueryResult:
    """Run a read-only query through the recorder; parameters are bound server-side."""
    body = json.dumps({"sql": sql, "parameters": parameters or {}}, default=str).encode()
    try:
        msg = await nc.request(subjects.QUERY, body, timeout=timeout)
    except NoRespondersError as exc:
        raise TransientError(
            "no recorder answers bl.query.sql: start it (`beamline up`)", Reason.STORAGE_UNAVAILABLE
        ) from exc
    except NatsTimeout as exc:
        raise TransientError(
            f"the recorder did not answer within {timeout}s", Reason.STORAGE_UNAVAILABLE
        ) from exc
    reply = json.loads(msg.data)
    if "error" in reply:
        err = reply["error"]
        message = err.get("message", "query failed")
        if err.get("reason") == Reason.STORAGE_UNAVAILABLE.value:
            raise TransientError(message, Reason.STORAGE_UNAVAILABLE)
        raise CallerError(message, Reason.QUERY_REJECTED)
    return QueryResult.model_validate(reply)


async def trace(nc: NATS, key: str, timeout: float = 15.0) -> QueryResult:
    """A trace, conversation or envelope by id (reads.TRACE_SQLS: the fast path first)."""
    result = QueryResult(columns=[], rows=[])
    for sql in reads.TRACE_SQLS:
        result = await query(nc, sql, {"id": key}, timeout)
        if result.rows:
            break
    return result
