"""ClickHouse, through clickhouse-connect only: connect, migrate, build rows, read safely.

URLs: `chdb://PATH` is an embedded in-process chDB engine (one engine path per process: the
recorder owns it, and every other process reads through the recorder's `bl.query.sql`
endpoint, client side in `beamline.query`); `http(s)://user:pass@host:port/db` is a server.

Every value a caller supplies reaches ClickHouse as a server-side parameter (`{name:Type}`
in the SQL, `parameters=` to the client), never by string formatting.

Counting rows: `bl_messages` is a ReplacingMergeTree keyed by (ts, id). An envelope
republished as a new stream message can leave two physical rows until a merge. Count with
`FROM bl_messages FINAL` or `uniqExact(id)`, and read lists with FINAL (the helpers here do).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit, urlunsplit

import clickhouse_connect
import orjson
from clickhouse_connect.driver.client import Client as Client  # re-exported: storage.Client
from clickhouse_connect.driver.exceptions import (
    DatabaseError,
    OperationalError,
    StreamFailureError,
)

from beamline import ids, subjects
from beamline.bus import parse_traceparent
from beamline.envelope import Kind
from beamline.errors import CallerError, ConfigError, Reason, TransientError

log = logging.getLogger("beamline.storage")
MESSAGES_TABLE: Final = "bl_messages"
MIGRATIONS_TABLE: Final = "bl_schema_migrations"
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

SCHEMA_DIR_ENV: Final = "BEAMLINE_CLICKHOUSE_SCHEMA_DIR"
_MIGRATION_FILE = re.compile(r"^(\d+)_[A-Za-z0-9_\-]+\.sql$")
_migrate_lock = threading.Lock()


# --- connecting ------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL without its password, for logs and health answers."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(url: str, settings: Mapping[str, Any] | None = None, timeout_s: float = 10.0) -> Client:
    """A clickhouse-connect client for `chdb://PATH` or `http(s)://user:pass@host:port/db`.

    `settings` become session settings, applied in order (for chDB with SET on this
    client's own handle; for a server they ride on every request). Put `readonly` last:
    once it is set, no other setting can change. Raises ConfigError for an unusable URL and
    TransientError(STORAGE_UNAVAILABLE) when the server cannot be reached.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    try:
        if scheme == "chdb":
            rest = url[len("chdb://") :].split("?", 1)[0]
            location = unquote(rest)
            if location in ("", "memory", ":memory:"):
                return clickhouse_connect.get_client(
                    interface="chdb", settings=dict(settings or {})
                )
            path = os.path.realpath(location)  # chDB compares engine paths literally
            os.makedirs(path, exist_ok=True)
            return clickhouse_connect.get_client(
                interface="chdb", path=path, settings=dict(settings or {})
            )
        if scheme in ("http", "https"):
            return clickhouse_connect.get_client(
                dsn=url,
                settings=dict(settings or {}),
                connect_timeout=timeout_s,
                send_receive_timeout=max(timeout_s, 30.0),
                autogenerate_session_id=False,
                query_retries=0,
            )
    except OperationalError as exc:
        raise TransientError(
            f"ClickHouse at {redact_url(url)} is unavailable: {exc}", Reason.STORAGE_UNAVAILABLE
        ) from exc
    except OSError as exc:
        raise TransientError(
            f"ClickHouse at {redact_url(url)} is unavailable: {exc}", Reason.STORAGE_UNAVAILABLE
        ) from exc
    raise ConfigError(
        f"BEAMLINE_CLICKHOUSE_URL {redact_url(url)!r} is not usable: "
        "use chdb://PATH (embedded) or http(s)://user:pass@host:port/db (a server)"
    )


# --- migrations ------------------------------------------------------------------------


def schema_dir() -> Path:
    """infra/clickhouse of this repository, or $BEAMLINE_CLICKHOUSE_SCHEMA_DIR."""
    override = os.environ.get(SCHEMA_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent.parent / "infra" / "clickhouse"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations(directory: Path | None = None) -> list[Migration]:
    """The `NNN_name.sql` files of the schema directory, in version order."""
    directory = directory or schema_dir()
    if not directory.is_dir():
        raise ConfigError(
            f"ClickHouse schema directory {directory} does not exist: set {SCHEMA_DIR_ENV} "
            "to the folder holding NNN_name.sql files (infra/clickhouse in the repository)"
        )
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        match = _MIGRATION_FILE.match(path.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise ConfigError(
                f"two migrations have version {version}: {found[version].name} and {path.name}"
            )
        found[version] = Migration(version, path.name, path.read_text())
    return [found[v] for v in sorted(found)]


def migrate(client: Client, directory: Path | None = None) -> list[int]:
    """Apply the schema files not yet recorded in bl_schema_migrations; return their versions.

    Every statement in a file must be idempotent (CREATE ... IF NOT EXISTS): a crash between
    a statement and its record re-runs the file harmlessly. Safe to call twice and from
    several threads of one process (a lock serialises the calls).
    """
    with _migrate_lock:
        client.command(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
            " version UInt32, name String, checksum String,"
            " applied_at DateTime64(6, 'UTC') DEFAULT now64(6)"
            ") ENGINE = ReplacingMergeTree ORDER BY version"
        )
        applied = {
            int(row[0]): str(row[1])
            for row in client.query(
                f"SELECT version, argMax(checksum, applied_at) FROM {MIGRATIONS_TABLE}"
                " GROUP BY version"
            ).result_rows
        }
        done: list[int] = []
        for m in migrations(directory):
            if m.version in applied:
                if applied[m.version] != m.checksum:
                    log.warning(
                        "schema file changed after it was applied; it is not re-applied: "
                        "add a new NNN_*.sql file for the change",
                        extra={"migration": m.name, "version": m.version},
                    )
                continue
            for statement in split_statements(m.sql):
                client.command(statement)
            client.insert(
                MIGRATIONS_TABLE,
                [[m.version, m.name, m.checksum]],
                column_names=["version", "name", "checksum"],
                column_type_names=["UInt32", "String", "String"],
            )
            log.info("schema migration applied", extra={"migration": m.name})
            done.append(m.version)
        return done


# --- SQL text scanning (statement splitting, read-only checks) --------------------------


def _scan(sql: str) -> tuple[list[str], bool]:
    """Split SQL on `;` outside quotes and comments; also say whether the text ends inside
    an unclosed quote or comment. Returns the statements (comments kept, empties dropped)."""
    statements: list[str] = []
    start = 0
    i, n = 0, len(sql)
    unclosed = False
    while i < n:
        c = sql[i]
        if c in ("'", '"', "`"):
            j = i + 1
            while j < n:
                if sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:  # doubled quote
                        j += 2
                        continue
                    break
                j += 1
            if j >= n:
                unclosed = True
            i = j + 1
        elif (c == "-" and sql.startswith("--", i)) or (
            c == "#" and sql.startswith(("# ", "#!"), i)
        ):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == "/" and sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            if j < 0:
                unclosed = True
                i = n
            else:
                i = j + 2
        elif c == ";":
            statements.append(sql[start:i])
            start = i + 1
            i += 1
        else:
            i += 1
    statements.append(sql[start:])
    return [s for s in statements if _strip_comments(s).strip()], unclosed


def _strip_comments(sql: str) -> str:
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        if sql.startswith("--", i) or sql.startswith(("# ", "#!"), i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
            out.append(" ")
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
            out.append(" ")
        else:
            out.append(sql[i])
            i += 1
    return "".join(out)


def split_statements(sql: str) -> list[str]:
    """The statements of a schema file, split on `;` outside quotes and comments."""
    statements, _ = _scan(sql)
    return [s.strip() for s in statements]


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
    statements, unclosed = _scan(sql)
    if unclosed:
        raise CallerError("sql has an unclosed quote or comment", Reason.QUERY_REJECTED)
    if len(statements) != 1:
        raise CallerError(
            f"send exactly one statement; got {len(statements)} separated by ';'",
            Reason.QUERY_REJECTED,
        )
    # a newline ends a trailing `--` comment, so nothing a client appends can fall into it
    statement = statements[0].strip() + "\n"
    words = _strip_comments(statement).split(None, 1)
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


# --- rows ------------------------------------------------------------------------------

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


# --- reads -----------------------------------------------------------------------------


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


def classify(exc: BaseException) -> Reason:
    """STORAGE_UNAVAILABLE for connection trouble; QUERY_REJECTED for what ClickHouse refused."""
    if isinstance(exc, StreamFailureError | CallerError):  # failed inside ClickHouse
        return Reason.QUERY_REJECTED
    if isinstance(exc, OperationalError | OSError | TransientError):
        return Reason.STORAGE_UNAVAILABLE
    if isinstance(exc, DatabaseError):
        return Reason.QUERY_REJECTED
    return Reason.STORAGE_UNAVAILABLE
