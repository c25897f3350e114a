"""`beamline db migrate` as a real subprocess against a throwaway chDB path (the test
process itself never opens chDB: one engine per process): schema files applied once and in
order, recorded with their checksums, a changed file refused, retention TTLs set and changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from beamline import storage
from beamline.settings import RetentionSettings

ROOT = Path(__file__).resolve().parents[2]
BEAMLINE = str(Path(sys.executable).parent / "beamline")

HOLD = """
import sys
from beamline import storage
from beamline.settings import RetentionSettings
client = storage.connect(sys.argv[1])
client.query("SELECT 1")
print("ready", flush=True)
sys.stdin.read()  # hold the engine until the test closes our stdin
"""


QUERY = """
import json, sys
from beamline import storage
from beamline.settings import RetentionSettings
client = storage.connect(sys.argv[1])
print(json.dumps(client.query(sys.argv[2]).result_rows, default=str))
"""
TTL = {
    "bl_messages": "TTL toDateTime(ts) + toIntervalDay({})",
    "otel_traces": "TTL toDateTime(Timestamp) + toIntervalDay({})",
    "otel_traces_trace_id_ts": "TTL toDateTime(End) + toIntervalDay({})",
    "bl_messages_id_ts": "TTL toDateTime(last_ts) + toIntervalDay({})",
    "bl_messages_by_trace": "TTL toDateTime(ts) + toIntervalDay({})",
}


def migrate(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("BEAMLINE_RETENTION_")}
    return subprocess.run(
        [BEAMLINE, "db", "migrate"],
        env={**inherited, "BEAMLINE_CLICKHOUSE_URL": url, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def query(url: str, sql: str) -> list[list[Any]]:
    """Rows of a query, read by a process of its own (chDB: one engine per process)."""
    out = subprocess.run(
        [sys.executable, "-c", QUERY, url, sql],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    rows: list[list[Any]] = json.loads(out.stdout)
    return rows


def create_statements(url: str) -> dict[str, str]:
    return dict(
        query(
            url,
            "SELECT name, create_table_query FROM system.tables"
            " WHERE database = currentDatabase() AND engine LIKE '%MergeTree'",
        )
    )


def test_migrate_applies_the_schema_once_then_nothing(tmp_path: Path) -> None:
    url = f"chdb://{tmp_path / 'ch'}"
    first = migrate(url)
    assert first.returncode == 0, first.stderr
    assert "applied 1 001_messages.sql" in first.stdout
    assert "applied 2 002_otel_traces.sql" in first.stdout
    assert "applied 3 003_messages_id_ts.sql" in first.stdout
    assert "applied 4 004_messages_by_trace.sql" in first.stdout
    second = migrate(url)
    assert second.returncode == 0, second.stderr
    assert "up to date (version 4); nothing applied" in second.stdout
    assert "applied" not in second.stdout.replace("nothing applied", "")
    assert "TTL" not in second.stdout  # the retention was set by the first run
    recorded = query(url, "SELECT version, name, checksum, applied_at > 0 FROM bl_schema_migrations FINAL ORDER BY version")  # fmt: skip
    assert recorded == [[m.version, m.name, m.checksum, True] for m in storage.migrations()]


def test_migrate_applies_only_new_files_and_refuses_a_changed_one(tmp_path: Path) -> None:
    schema = tmp_path / "schema"
    shutil.copytree(ROOT / "infra/clickhouse", schema)
    url, env = f"chdb://{tmp_path / 'ch'}", {"BEAMLINE_CLICKHOUSE_SCHEMA_DIR": str(schema)}
    assert migrate(url, **env).returncode == 0
    notes = schema / "005_notes.sql"
    notes.write_text("CREATE TABLE IF NOT EXISTS notes (id String) ENGINE = MergeTree ORDER BY id;")
    added = migrate(url, **env)
    assert added.returncode == 0, added.stderr
    assert added.stdout.count("applied ") == 1 and "applied 5 005_notes.sql" in added.stdout

    # comments and layout are not what a file runs: correcting them is no change
    first = schema / "001_messages.sql"
    first.write_text("-- a corrected comment\n" + first.read_text().replace("    ", "\t"))
    assert "nothing applied" in migrate(url, **env).stdout

    notes.write_text(notes.read_text().replace("(id String)", "(id String, text String)"))
    refused = migrate(url, **env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "005_notes.sql changed after" in refused.stderr
    assert "new NNN_name.sql file" in refused.stderr
    assert "text" not in create_statements(url)["notes"]  # nothing was run
    assert [v for v, in query(url, "SELECT version FROM bl_schema_migrations FINAL ORDER BY version")] == [1, 2, 3, 4, 5]  # fmt: skip


def test_retention_is_a_ttl_that_a_later_migrate_changes(tmp_path: Path) -> None:
    url = f"chdb://{tmp_path / 'ch'}"
    first = migrate(url)
    assert first.returncode == 0, first.stderr
    tables = create_statements(url)
    for table, days in [
        ("bl_messages", 90),
        ("bl_messages_id_ts", 90),
        ("bl_messages_by_trace", 30),
        ("otel_traces", 30),
        ("otel_traces_trace_id_ts", 30),
    ]:
        assert TTL[table].format(days) in tables[table], tables[table]
        assert f"{table} {TTL[table].format(days)} (was none)" in first.stdout

    env = {"BEAMLINE_RETENTION_BL_MESSAGES_DAYS": "7", "BEAMLINE_RETENTION_OTEL_TRACES_DAYS": "0"}
    changed = migrate(url, **env)
    assert changed.returncode == 0, changed.stderr
    assert f"bl_messages {TTL['bl_messages'].format(7)} (was toDateTime(ts)" in changed.stdout
    assert "otel_traces TTL removed: rows are kept forever" in changed.stdout
    tables = create_statements(url)
    assert TTL["bl_messages"].format(7) in tables["bl_messages"]
    assert TTL["bl_messages_id_ts"].format(7) in tables["bl_messages_id_ts"]
    # the trace-sorted copy never outlives the messages it copies
    assert TTL["bl_messages_by_trace"].format(7) in tables["bl_messages_by_trace"]
    assert " TTL " not in tables["otel_traces"] + tables["otel_traces_trace_id_ts"]
    assert "TTL" not in migrate(url, **env).stdout  # set once, not at every start

    bad = migrate(url, BEAMLINE_RETENTION_BL_MESSAGES_DAYS="-1")
    assert bad.returncode == 2 and "bl_messages_days" in bad.stderr, bad.stderr


def test_a_checksum_is_of_the_statements_not_the_comments() -> None:
    sql = "-- why\nCREATE TABLE t (a String)\nENGINE = Memory; /* more */"
    same = storage.Migration(1, "001_t.sql", "CREATE TABLE t   (a String) ENGINE = Memory;\n")
    other = storage.Migration(1, "001_t.sql", "CREATE TABLE t (a UInt8) ENGINE = Memory;")
    assert storage.Migration(1, "001_t.sql", sql).checksum == same.checksum != other.checksum


def test_a_table_ttl_is_read_from_its_engine_clause() -> None:
    engine = "MergeTree ORDER BY (ts, id) TTL toDateTime(ts) + toIntervalDay(9) SETTINGS a = 1"
    assert storage.table_ttl(engine) == "toDateTime(ts) + toIntervalDay(9)"
    assert storage.table_ttl(engine.split(" SETTINGS")[0]).endswith("toIntervalDay(9)")
    assert storage.table_ttl("MergeTree ORDER BY id SETTINGS a = 1") == ""
    policy = storage.retention_policy(RetentionSettings(bl_messages_days=9, otel_traces_days=0))
    assert [(r.table, r.ttl) for r in policy] == [
        ("bl_messages", "toDateTime(ts) + toIntervalDay(9)"),
        ("bl_messages_id_ts", "toDateTime(last_ts) + toIntervalDay(9)"),
        ("bl_messages_by_trace", "toDateTime(ts) + toIntervalDay(9)"),
        ("otel_traces", ""),
        ("otel_traces_trace_id_ts", ""),
    ]


def test_migrate_says_so_when_another_process_holds_the_embedded_engine(tmp_path: Path) -> None:
    url = f"chdb://{tmp_path / 'ch'}"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        held = migrate(url)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert held.returncode == 2, held.stdout + held.stderr
    assert "open in another process" in held.stderr
    assert "Stop the mesh" in held.stderr and "let the recorder migrate" in held.stderr
    # once the holder is gone, the same path migrates
    assert migrate(url).returncode == 0
