"""ClickHouse, through clickhouse-connect only: connect, migrate (the ordered schema files of
infra/clickhouse, recorded in bl_schema_migrations, and each table's retention TTL), classify
failures.

URLs: `chdb://PATH` is an embedded in-process chDB engine (one engine path per process: the
recorder owns it, and every other process reads through the recorder's `bl.query.sql`
endpoint, client side in `beamline.query`); `http(s)://user:pass@host:port/db` is a server.

Every value a caller supplies reaches ClickHouse as a server-side parameter (`{name:Type}`
in the SQL, `parameters=` to the client), never by string formatting.

The rest of the storage layer, one concept a module: `beamline.rows` (the `bl_messages`
rows the recorder builds and inserts), `beamline.reads` (typed reads of a conversation or a
trace), `beamline.readonly` (the guard and session for untrusted read queries) and
`beamline.sqltext` (quote- and comment-aware SQL splitting).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit, urlunsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client as Client  # re-exported: storage.Client
from clickhouse_connect.driver.exceptions import (
    DatabaseError,
    OperationalError,
    StreamFailureError,
)
from pydantic import ValidationError

from beamline.errors import CallerError, ConfigError, Reason, TransientError
from beamline.settings import RetentionSettings
from beamline.sqltext import split_statements, strip_comments

log = logging.getLogger("beamline.storage")
MIGRATIONS_TABLE: Final = "bl_schema_migrations"

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
    except (OperationalError, OSError) as exc:
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
        """sha256 of what the file runs: its statements without comments, whitespace
        collapsed. A comment can be corrected after the file was applied; a statement cannot
        (whitespace inside a quoted literal is collapsed too, which no schema file relies on)."""
        h = hashlib.sha256()
        for statement in split_statements(self.sql):
            h.update(" ".join(strip_comments(statement).split()).encode())
            h.update(b";\n")
        return h.hexdigest()


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


@dataclass(frozen=True, slots=True)
class Retention:
    """Rows of `table` live `days` after their `column` (0: forever), as a table TTL."""

    table: str
    column: str
    days: int

    @property
    def ttl(self) -> str:
        """The TTL expression as ClickHouse prints it back in system.tables, '' for none."""
        return f"toDateTime({self.column}) + toIntervalDay({self.days})" if self.days else ""


@dataclass(frozen=True, slots=True)
class TtlChange:
    table: str
    before: str  # TTL expressions; '' for none
    after: str


@dataclass(frozen=True, slots=True)
class Migrated:
    """What a `migrate` call changed: the files it applied and the TTLs it set."""

    applied: list[Migration]
    retention: list[TtlChange]
    version: int  # the newest schema file's: where the database is now


def retention_policy(settings: RetentionSettings | None = None) -> list[Retention]:
    """The TTL of every table the recorder writes, from BEAMLINE_RETENTION_* by default."""
    try:
        s = settings or RetentionSettings()
    except ValidationError as exc:
        raise ConfigError(f"BEAMLINE_RETENTION_* is not usable: {exc}") from exc
    return [
        Retention("bl_messages", "ts", s.bl_messages_days),
        # `beamline trace` finds a message's time range here: a row lives as long as the
        # newest message it covers (last_ts is the latest ts of its key).
        Retention("bl_messages_id_ts", "last_ts", s.bl_messages_days),
        # a copy never outlives the record it copies
        Retention(
            "bl_messages_by_trace", "ts", _shorter(s.bl_messages_by_trace_days, s.bl_messages_days)
        ),
        Retention("otel_traces", "Timestamp", s.otel_traces_days),
        # The plugin finds a trace's spans through this table: a row lives as long as the
        # last span it covers (End is the latest Timestamp of its insert block).
        Retention("otel_traces_trace_id_ts", "End", s.otel_traces_days),
    ]


def _shorter(days: int, other: int) -> int:
    """The shorter of two retentions in days, where 0 is forever."""
    return min(d for d in (days, other) if d) if days or other else 0


def migrate(
    client: Client, directory: Path | None = None, retention: list[Retention] | None = None
) -> Migrated:
    """Apply the schema files not yet recorded in bl_schema_migrations, then bring each
    table's TTL to `retention` (default: `retention_policy()`).

    Raises ConfigError, before applying anything, when a file applied earlier has changed:
    an applied file is never run again, so its change would silently not happen. Every
    statement in a file must be idempotent (CREATE ... IF NOT EXISTS): a crash between a
    statement and its record re-runs the file harmlessly. Safe to call twice and from
    several threads of one process (a lock serialises the calls).
    """
    with _migrate_lock:
        client.command(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
            " version UInt32, name String, checksum String,"
            " applied_at DateTime64(6, 'UTC') DEFAULT now64(6)"
            ") ENGINE = ReplacingMergeTree ORDER BY version"
        )
        recorded = {
            int(row[0]): str(row[1])
            for row in client.query(
                f"SELECT version, argMax(checksum, applied_at) FROM {MIGRATIONS_TABLE}"
                " GROUP BY version"
            ).result_rows
        }
        found = migrations(directory)
        _refuse_changed(found, recorded)
        done: list[Migration] = []
        for m in found:
            if m.version in recorded:
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
            done.append(m)
        policy = retention_policy() if retention is None else retention
        version = max((m.version for m in found), default=0)
        return Migrated(done, set_retention(client, policy), version)


def _refuse_changed(found: list[Migration], recorded: Mapping[int, str]) -> None:
    changed = [m.name for m in found if recorded.get(m.version, m.checksum) != m.checksum]
    if changed:
        raise ConfigError(
            f"schema file(s) {', '.join(changed)} changed after they were applied to this "
            "database, and an applied file is never run again: restore them (git checkout) "
            "and put the change in a new NNN_name.sql file"
        )


_TTL_CLAUSE = re.compile(r" TTL (.+?)(?: SETTINGS |$)")


def table_ttl(engine_full: str) -> str:
    """The TTL expression of a table from its system.tables `engine_full`; '' for none."""
    match = _TTL_CLAUSE.search(engine_full)
    return match.group(1) if match else ""


def set_retention(client: Client, policy: list[Retention]) -> list[TtlChange]:
    """ALTER TABLE ... MODIFY (or REMOVE) TTL where a table's TTL differs from the policy.

    Only a change is applied: MODIFY TTL also starts a mutation that recomputes the TTL of
    every existing part (materialize_ttl_after_modify), which is work worth doing once, not
    at every start. It runs in the background; the ALTER returns at once. Tables that do not
    exist (a schema directory without them) are skipped.
    """
    engines: dict[str, str] = {
        str(name): str(engine)
        for name, engine in client.query(
            "SELECT name, engine_full FROM system.tables"
            " WHERE database = currentDatabase() AND name IN {names:Array(String)}",
            parameters={"names": [r.table for r in policy]},
        ).result_rows
    }
    changes: list[TtlChange] = []
    for r in policy:
        if r.table not in engines:
            continue
        before = table_ttl(engines[r.table])
        if before == r.ttl:
            continue
        action = f"MODIFY TTL {r.ttl}" if r.ttl else "REMOVE TTL"
        client.command(f"ALTER TABLE {r.table} {action}")
        log.info("retention changed", extra={"table": r.table, "before": before, "ttl": r.ttl})
        changes.append(TtlChange(r.table, before, r.ttl))
    return changes


def classify(exc: BaseException) -> Reason:
    """STORAGE_UNAVAILABLE for connection trouble; QUERY_REJECTED for what ClickHouse refused."""
    if isinstance(exc, StreamFailureError | CallerError):  # failed inside ClickHouse
        return Reason.QUERY_REJECTED
    if isinstance(exc, OperationalError | OSError | TransientError):
        return Reason.STORAGE_UNAVAILABLE
    if isinstance(exc, DatabaseError):
        return Reason.QUERY_REJECTED
    return Reason.STORAGE_UNAVAILABLE
