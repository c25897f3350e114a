"""Untrusted read queries (`bl.query.sql`): the SQL guard, the read-only session and the
JSON answer.

Three locks: `check_readonly_sql` accepts one read statement whose values are all bound
server-side; the client runs it with `readonly_settings` (ClickHouse itself refuses writes,
DDL and SET); and those settings bound its time and rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import orjson
from clickhouse_connect.driver.client import Client

from beamline.errors import CallerError, Reason
from beamline.sqltext import scan, strip_comments

_READ_KEYWORDS: Final = ("SELECT", "WITH", "DESCRIBE", "DESC", "SHOW")
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*):([^{}]+)\}")
MAX_SQL_CHARS: Final = 100_000


def check_readonly_sql(sql: Any, parameters: Any = None) -> tuple[str, dict[str, Any]]:
    """Accept one SELECT / WITH / DESCRIBE / SHOW statement whose parameters are all bound
    server-side; raise CallerError(QUERY_REJECTED) naming what is wrong otherwise.

    This is the first of three locks: the statement is also run on a session with
    `readonly=1` (ClickHouse refuses writes, DDL, SET and file/url/executable table
    functions), with max_execution_time and max_result_rows limits.
    """
    if not isinstance(sql, str) or not sql.strip():
        raise CallerError("sql must be a non-empty string", Reason.QUERY_REJECTED)
    if len(sql) > MAX_SQL_CHARS:
        raise CallerError(f"sql is over {MAX_SQL_CHARS} characters", Reason.QUERY_REJECTED)
    if "\x00" in sql:
        raise CallerError("sql contains a NUL character", Reason.QUERY_REJECTED)
    statements, unclosed = scan(sql)
    if unclosed:
        raise CallerError("sql has an unclosed quote or comment", Reason.QUERY_REJECTED)
    if len(statements) != 1:
        raise CallerError(
            f"send exactly one statement; got {len(statements)} separated by ';'",
            Reason.QUERY_REJECTED,
        )
    # a newline ends a trailing `--` comment, so nothing a client appends can fall into it
    statement = statements[0].strip() + "\n"
    words = strip_comments(statement).split(None, 1)
    first = words[0].upper() if words else ""
    if first not in _READ_KEYWORDS:
        raise CallerError(
            f"only {', '.join(_READ_KEYWORDS)} statements are accepted, not {first[:20]!r}",
            Reason.QUERY_REJECTED,
        )
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise CallerError("parameters must be a JSON object", Reason.QUERY_REJECTED)
    placeholders = {m.group(1) for m in _PLACEHOLDER.finditer(statement)}
    for name in parameters:
        if not isinstance(name, str) or not _PARAM_NAME.match(name):
            raise CallerError(f"parameter name {name!r} is not valid", Reason.QUERY_REJECTED)
        if name not in placeholders:
            # without a placeholder, clickhouse-connect would format values client-side
            raise CallerError(
                f"parameter {name!r} is not used as a {{{name}:Type}} placeholder in the sql",
                Reason.QUERY_REJECTED,
            )
    missing = placeholders - set(parameters)
    if missing:
        raise CallerError(
            f"placeholders without a value in parameters: {', '.join(sorted(missing))}",
            Reason.QUERY_REJECTED,
        )
    return statement, dict(parameters)


def readonly_settings(max_execution_time_s: float, max_result_rows: int) -> dict[str, Any]:
    """Session settings for a read-only client, `readonly` last: once it is set, no setting
    can change (so a query cannot lift the limits with its own SETTINGS clause)."""
    return {
        "max_execution_time": max(1, int(max_execution_time_s)),
        "max_result_rows": int(max_result_rows),
        "result_overflow_mode": "throw",
        # the JSONCompact answer: numbers as numbers, ISO 8601 times, valid UTF-8
        "output_format_json_quote_64bit_integers": 0,
        "output_format_json_quote_decimals": 0,
        "output_format_json_validate_utf8": 1,
        "date_time_output_format": "iso",
        "readonly": 1,
    }


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[list[Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"columns": self.columns, "types": self.types, "rows": self.rows}


def run_readonly(client: Client, sql: Any, parameters: Any = None) -> QueryResult:
    """Check and run one read statement on a read-only client (see `readonly_settings`).

    The result travels as ClickHouse's JSONCompact: the column names and types come back
    even for zero rows, and values are JSON already (times as ISO 8601 text)."""
    statement, params = check_readonly_sql(sql, parameters)
    raw = client.raw_query(statement, parameters=params or None, fmt="JSONCompact")
    answer = orjson.loads(raw)
    meta = answer.get("meta", [])
    return QueryResult(
        columns=[str(m["name"]) for m in meta],
        types=[str(m["type"]) for m in meta],
        rows=answer.get("data", []),
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)  # Decimal, IP addresses, UUID-likes, ...


def dumps(value: Any) -> bytes:
    """JSON bytes for query answers: datetimes in ISO 8601 UTC, anything else as text."""
    return orjson.dumps(
        value,
        default=_json_default,
        option=orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS,
    )
