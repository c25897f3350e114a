"""ClickHouse, through clickhouse-connect only: connect, migrate, classify failures.

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

from beamline.errors import CallerError, ConfigError, Reason, TransientError
from beamline.sqltext import split_statements

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


def classify(exc: BaseException) -> Reason:
    """STORAGE_UNAVAILABLE for connection trouble; QUERY_REJECTED for what ClickHouse refused."""
    if isinstance(exc, StreamFailureError | CallerError):  # failed inside ClickHouse
        return Reason.QUERY_REJECTED
    if isinstance(exc, OperationalError | OSError | TransientError):
        return Reason.STORAGE_UNAVAILABLE
    if isinstance(exc, DatabaseError):
        return Reason.QUERY_REJECTED
    return Reason.STORAGE_UNAVAILABLE
