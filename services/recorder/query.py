"""`bl.query.sql`: read-only SQL from any process, answered from the recorder's ClickHouse.

In embedded mode chDB lives inside the recorder (one engine per process), so every other
process reads through here. A request is `{"sql": "...", "parameters": {...}}`; the answer
is `{"columns", "types", "rows"}` or `{"error": {"reason", "message"}}`. A statement the
guard refuses is answered without waiting for the query lock; queries run one at a time on
the read-only client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from beamline import readonly, storage
from beamline.errors import CallerError, Reason
from services.recorder.health import Health, first_line
from services.recorder.store import Store

log = logging.getLogger("beamline.recorder")


class QueryEndpoint:
    def __init__(self, nc: NATS, store: Store, health: Health) -> None:
        self.nc = nc
        self.store = store
        self.health = health
        self._lock = asyncio.Lock()

    async def answer(self, msg: Msg) -> None:
        """Answer one request; every failure becomes an error reply with its reason."""
        self.health.queries += 1
        try:
            data = await self._run(msg.data)
        except CallerError as exc:
            data = _error_reply(exc.reason, exc.message)
        except Exception as exc:
            reason = storage.classify(exc)
            log.info("query failed", extra={"reason": reason.value, "error": first_line(exc)})
            data = _error_reply(reason, str(exc).strip()[:2000])
        with contextlib.suppress(Exception):
            await msg.respond(data)

    async def _run(self, request: bytes) -> bytes:
        sql, parameters = _parse_request(request)
        readonly.check_readonly_sql(sql, parameters)  # reject early, without the lock
        async with self._lock:
            result = await asyncio.to_thread(self.store.query, sql, parameters)
        data = readonly.dumps(result.as_dict())
        if len(data) > self.nc.max_payload:
            raise CallerError(
                f"the result is {len(data)} bytes, over the NATS limit of "
                f"{self.nc.max_payload}: add a LIMIT or select fewer columns",
                Reason.QUERY_REJECTED,
            )
        return data


def _parse_request(request: bytes) -> tuple[Any, Any]:
    """(sql, parameters) of a request; their types are checked by `check_readonly_sql`."""
    try:
        body = orjson.loads(request)
    except orjson.JSONDecodeError as exc:
        raise CallerError(
            'the request is not JSON: send {"sql": "...", "parameters": {...}}',
            Reason.QUERY_REJECTED,
        ) from exc
    if not isinstance(body, dict):
        raise CallerError(
            'send a JSON object {"sql": "...", "parameters": {...}}', Reason.QUERY_REJECTED
        )
    return body.get("sql"), body.get("parameters")


def _error_reply(reason: Reason, message: str) -> bytes:
    return orjson.dumps({"error": {"reason": reason.value, "message": message}})
