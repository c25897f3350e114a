"""storage against a real in-process chDB: migrations, de-duplicated inserts, typed reads,
hostile inputs through parameters, and the read-only query path.

chDB hosts one engine path per process, so every in-process chDB test of this session shares
one session-scoped directory (`chdb_url`). Tests use their own conversation/trace ids.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from beamline import bus, ids, storage
from beamline.envelope import Envelope, Kind, ReplyPayload, TaskPayload
from beamline.errors import CallerError, ConfigError, Reason, TransientError
from beamline.readonly import check_readonly_sql, readonly_settings, run_readonly
from beamline.reads import MESSAGES_ID_TS_TABLE, TRACE_BY_TRACE_SQL, TRACE_SQL
from beamline.rows import (
    COLUMN_TYPES,
    COLUMNS,
    KIND,
    REASON,
    TS,
    envelope_row,
    insert_rows,
    stored_ids,
)
from beamline.sqltext import split_statements
from beamline.testing import free_port
from services.recorder.batch import Batch
from services.recorder.settings import RecorderSettings
from services.recorder.store import Store

HOSTILE = [
    "' OR 1=1 --",
    "'); DROP TABLE bl_messages; --",
    "x' UNION SELECT name FROM system.tables --",
    "\\' OR ''='",
    "{id:String}",
]


@pytest.fixture(scope="session")
def chdb_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"chdb://{tmp_path_factory.mktemp('chdb')}"


@pytest.fixture(scope="session")
def client(chdb_url: str) -> Iterator[storage.Client]:
    c = storage.connect(chdb_url)
    storage.migrate(c)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="session")
def ro(chdb_url: str, client: storage.Client) -> Iterator[storage.Client]:
    c = storage.connect(chdb_url, readonly_settings(1, 100))
    try:
        yield c
    finally:
        c.close()


def rows_for(conversation: str, n: int, stream: str = "BL_REPLIES") -> list[list[Any]]:
    first = Envelope(
        kind=Kind.TASK,
        sender="user",
        recipient="agent",
        conversation_id=conversation,
        payload=TaskPayload(prompt="q"),
    )
    envs = [first] + [
        first.child(ReplyPayload(task_id=first.id, text=f"r{i}"), sender="agent", recipient="user")
        for i in range(n - 1)
    ]
    return stored(envs, stream)


def stored(envelopes: list[Envelope], stream: str = "BL_REPLIES") -> list[list[Any]]:
    """The rows the recorder writes for these envelopes."""
    return [
        envelope_row(
            bus.encode(e),
            subject=f"bl.reply.{e.conversation_id}",
            stream=stream,
            stream_seq=i + 1,
            stream_ts_ns=0,
            max_message_bytes=262144,
        )
        for i, e in enumerate(envelopes)
    ]


def trace_ids(ro: storage.Client, key: str) -> list[str]:
    """The envelope ids `beamline trace KEY` shows, in its order."""
    return [str(r[0]) for r in run_readonly(ro, TRACE_SQL, {"id": key}).rows]


def count(client: storage.Client, conversation: str, final: bool = False) -> int:
    table = "bl_messages FINAL" if final else "bl_messages"
    result = client.query(
        f"SELECT count() FROM {table} WHERE conversation_id = {{c:String}}",
        parameters={"c": conversation},
    )
    return int(result.result_rows[0][0])


# --- migrations ------------------------------------------------------------------------


def test_migrate_is_idempotent_and_recorded(client: storage.Client) -> None:
    again = storage.migrate(client)  # the fixture applied everything already
    assert (again.applied, again.retention) == ([], [])
    assert again.version == storage.migrations()[-1].version
    threads = [threading.Thread(target=storage.migrate, args=(client,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = client.query("SELECT version, name FROM bl_schema_migrations FINAL").result_rows
    assert sorted(tuple(v) for v in versions) == [(m.version, m.name) for m in storage.migrations()]
    engine, sorting, partition = client.query(
        "SELECT engine, sorting_key, partition_key FROM system.tables"
        " WHERE database = currentDatabase() AND name = 'bl_messages'"
    ).result_rows[0]
    assert (engine, sorting, partition) == ("ReplacingMergeTree", "ts, id", "toYYYYMM(ts)")
    indexes = client.query(
        "SELECT expr, type FROM system.data_skipping_indices"
        " WHERE database = currentDatabase() AND table = 'bl_messages' ORDER BY expr"
    ).result_rows
    assert indexes == [
        ("conversation_id", "bloom_filter"),
        ("id", "bloom_filter"),
        ("trace_id", "bloom_filter"),
    ]
    # the trace searches filter ServiceName, SpanName and time: a prefix of the sorting key;
    # one trace by id is the bloom filter on TraceId
    sorting = client.query(
        "SELECT sorting_key FROM system.tables"
        " WHERE database = currentDatabase() AND name = 'otel_traces'"
    ).result_rows[0][0]
    assert sorting == "ServiceName, SpanName, toDateTime(Timestamp), SpanId"
    trace_index = client.query(
        "SELECT type FROM system.data_skipping_indices"
        " WHERE database = currentDatabase() AND table = 'otel_traces' AND expr = 'TraceId'"
    ).result_rows
    assert trace_index == [("bloom_filter",)]
    columns = client.query("DESCRIBE TABLE bl_messages").result_rows
    assert [c[0] for c in columns][: len(COLUMNS)] == list(COLUMNS)
    assert [c[1] for c in columns][: len(COLUMNS)] == list(COLUMN_TYPES)


def test_the_lookup_migrations_apply_on_top_of_a_database_with_001_and_002(
    chdb_url: str, client: storage.Client, tmp_path: Path
) -> None:
    """003 and 004 on a database that already holds messages: they are found through the new
    lookup table and the trace-sorted copy (the backfills), later inserts through their
    views, and running either again (a crash before it was recorded) changes no answer. A
    database of its own in the shared engine."""
    older = tmp_path / "schema"
    older.mkdir()
    for m in storage.migrations():
        if m.version < 3:
            (older / m.name).write_text(m.sql)
    database = f"upgrade_{uuid.uuid4().hex}"
    client.command(f"CREATE DATABASE {database}")
    path = os.path.realpath(chdb_url.removeprefix("chdb://"))
    c = clickhouse_connect.get_client(interface="chdb", path=path, database=database)
    try:
        assert [m.version for m in storage.migrate(c, older).applied] == [1, 2]
        before = rows_for("conv-before-003", 3)
        insert_rows(c, before)

        upgraded = storage.migrate(c)
        assert [m.name for m in upgraded.applied] == [
            "003_messages_id_ts.sql",
            "004_messages_by_trace.sql",
        ]
        policy = {r.table: r for r in storage.retention_policy()}
        assert policy[MESSAGES_ID_TS_TABLE].days == policy["bl_messages"].days
        engine = c.query(
            "SELECT engine_full FROM system.tables"
            " WHERE database = currentDatabase() AND name = {t:String}",
            parameters={"t": MESSAGES_ID_TS_TABLE},
        ).result_rows[0][0]
        assert storage.table_ttl(engine) == policy[MESSAGES_ID_TS_TABLE].ttl

        def found(key: str, sql: str = TRACE_SQL) -> list[str]:
            return [r[0] for r in c.query(sql, parameters={"id": key}).result_rows]

        def trace_of(conversation: str) -> str:
            return str(
                c.query(
                    "SELECT any(trace_id) FROM bl_messages WHERE conversation_id = {c:String}",
                    parameters={"c": conversation},
                ).result_rows[0][0]
            )

        def answers() -> list[list[str]]:
            traces = [trace_of("conv-before-003"), trace_of("conv-after-003")]
            return [
                found("conv-before-003"),
                found("conv-after-003"),
                *(found(t, TRACE_BY_TRACE_SQL) for t in traces),
            ]

        assert found("conv-before-003") == [r[0] for r in before]
        after = rows_for("conv-after-003", 2)
        insert_rows(c, after)
        want = [[r[0] for r in before], [r[0] for r in after]] * 2
        assert answers() == want

        for version in (3, 4):
            again = next(m for m in storage.migrations() if m.version == version)
            for statement in split_statements(again.sql):
                c.command(statement)
        assert answers() == want
        assert storage.migrate(c).applied == []
    finally:
        c.close()
        client.command(f"DROP DATABASE {database} SYNC")


def test_schema_dir_override_and_bad_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (storage.schema_dir() / "001_messages.sql").is_file()
    monkeypatch.setenv(storage.SCHEMA_DIR_ENV, str(tmp_path))
    assert storage.schema_dir() == tmp_path
    (tmp_path / "001_a.sql").write_text("SELECT 1")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [m.name for m in storage.migrations()] == ["001_a.sql"]
    (tmp_path / "01_b.sql").write_text("SELECT 1")
    with pytest.raises(ConfigError, match="two migrations have version 1"):
        storage.migrations()
    monkeypatch.setenv(storage.SCHEMA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="does not exist"):
        storage.migrations()


def test_split_statements_ignores_semicolons_in_quotes_and_comments() -> None:
    sql = "-- a; comment\nCREATE TABLE a (x String DEFAULT ';');\n/* ; */ SELECT 'it''s;' ;\n\n"
    assert split_statements(sql) == [
        "-- a; comment\nCREATE TABLE a (x String DEFAULT ';')",
        "/* ; */ SELECT 'it''s;'",
    ]


# --- writes ----------------------------------------------------------------------------


def test_insert_token_makes_a_retried_batch_add_nothing(client: storage.Client) -> None:
    rows = rows_for("conv-token", 5)
    insert_rows(client, rows)
    insert_rows(client, rows)  # same ids, same order: same token
    assert count(client, "conv-token") == 5
    insert_rows(client, rows[::-1])  # regrouped: a new token, the rows land again
    assert count(client, "conv-token") == 10
    # ...which is why the recorder drops stored ids first; reads use FINAL or uniqExact
    assert count(client, "conv-token", final=True) == 5
    uniq = client.query(
        "SELECT uniqExact(id) FROM bl_messages WHERE conversation_id = 'conv-token'"
    ).result_rows[0][0]
    assert uniq == 5
    found = stored_ids(client, [rows[0][0], rows[3][0], "not-there"])
    assert found == {rows[0][0]: True, rows[3][0]: True}
    assert stored_ids(client, []) == {}


def test_final_keeps_the_envelope_of_a_plain_task(client: storage.Client) -> None:
    """A plain task is recorded raw with derived_id(stream, seq); the intake's envelope of
    it has that id and the stream timestamp. FINAL keeps the envelope, whatever the order."""
    ns = 1_795_000_000_123_456_789
    raw = envelope_row(
        b'{"prompt": "hi", "conversation_id": "conv-plain"}',
        subject="bl.task.x",
        stream="BL_TASKS",
        stream_seq=777,
        stream_ts_ns=ns,
        max_message_bytes=1000,
    )
    assert raw[KIND] == "raw"
    env = Envelope(
        id=raw[0],
        kind=Kind.TASK,
        sender="client",
        recipient="agent",
        conversation_id="conv-plain",
        ts=datetime.fromtimestamp(ns / 1e9, UTC),  # what nats-py's metadata gives
        payload=TaskPayload(prompt="hi"),
    )
    enveloped = envelope_row(
        bus.encode(env),
        subject="bl.mbox.1.agent",
        stream="BL_MAILBOX",
        stream_seq=1,
        stream_ts_ns=ns + 5_000_000,
        max_message_bytes=1000,
    )
    assert enveloped[TS] == raw[TS] and enveloped[0] == raw[0]
    insert_rows(client, [enveloped])
    assert stored_ids(client, [raw[0]]) == {raw[0]: True}
    insert_rows(client, [raw])  # the raw row lands after the envelope
    final = client.query(
        "SELECT kind, conversation_id FROM bl_messages FINAL WHERE id = {i:String}",
        parameters={"i": raw[0]},
    ).result_rows
    assert final == [("task", "conv-plain")]


class FakeClient:
    """Refuses any insert that holds a non-raw row with id 'bad'."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, str, str]] = []
        self.queries = 0

    def insert(self, table: str, columns: list[list[Any]], **kw: Any) -> None:
        rows = list(zip(*columns, strict=True))
        if any(r[0] == "bad" and r[1] != "raw" for r in rows):
            raise DatabaseError("Code: 27. Cannot parse input")
        self.stored += [(r[0], r[1], r[REASON]) for r in rows]

    def query(self, *a: Any, **kw: Any) -> Any:
        self.queries += 1
        raise AssertionError("no look-up expected")


def test_poison_rows_are_isolated_and_stored_raw() -> None:
    fake = FakeClient()

    class FakeStore(Store):
        def writer(self) -> storage.Client:
            return cast(storage.Client, fake)  # no connect, no migrate

    store = FakeStore("chdb:///nonexistent", RecorderSettings(), 1000)
    batch: Batch[str] = Batch(100, 1)
    template = rows_for("conv-poison", 1)[0]
    for i in ["a", "b", "bad", "c", "d"]:
        batch.add([i, *template[1:]], i, now=0)
    with pytest.raises(DatabaseError):
        store.write(batch)
    result = store.write(batch, isolate=True)
    assert (result.inserted, result.poisoned) == (5, 1)
    assert sorted(fake.stored) == sorted(
        [(i, "task", "") for i in "abcd"] + [("bad", "raw", "poison")]
    )


# --- reads -----------------------------------------------------------------------------


def test_the_trace_query_finds_a_conversation_by_any_of_its_ids(
    client: storage.Client, ro: storage.Client
) -> None:
    rows = rows_for("conv-typed", 3)
    insert_rows(client, rows)
    for key in ("conv-typed", rows[0][0]):
        answer = run_readonly(ro, TRACE_SQL, {"id": key})
        assert {r[0] for r in answer.rows} >= {rows[0][0]}
    answer = run_readonly(ro, TRACE_SQL, {"id": "conv-typed"})
    assert [r[0] for r in answer.rows] == [r[0] for r in rows]


def test_the_trace_query_finds_a_trace_a_conversation_and_one_envelope(
    client: storage.Client, ro: storage.Client
) -> None:
    conversation = f"conv-lookup-{ids.uuid7()}"
    task = Envelope(
        kind=Kind.TASK,
        sender="user",
        recipient="agent",
        conversation_id=conversation,
        payload=TaskPayload(prompt="q"),
    )
    first = [task] + [
        task.child(ReplyPayload(task_id=task.id, text=f"r{i}"), sender="agent", recipient="user")
        for i in range(2)
    ]
    again = Envelope(  # the same conversation, a new trace
        kind=Kind.TASK,
        sender="user",
        recipient="agent",
        conversation_id=conversation,
        payload=TaskPayload(prompt="again"),
    )
    other = Envelope(  # at the same time, in the same granule: not ours
        kind=Kind.TASK,
        sender="user",
        recipient="agent",
        conversation_id=f"conv-other-{ids.uuid7()}",
        payload=TaskPayload(prompt="other"),
    )
    insert_rows(client, stored([*first, other, again]))

    assert trace_ids(ro, conversation) == [e.id for e in [*first, again]]
    assert trace_ids(ro, task.trace_id) == [e.id for e in first]
    assert trace_ids(ro, first[1].id) == [first[1].id]
    assert trace_ids(ro, again.trace_id) == [again.id]
    # no id at all is no id: not every message recorded without a conversation
    assert trace_ids(ro, "") == []
    assert trace_ids(ro, conversation + "' OR ''='") == []


def test_the_trace_query_shows_each_envelope_once(
    client: storage.Client, ro: storage.Client
) -> None:
    """Copies of an envelope collapse as FINAL collapses them, including a raw row and the
    envelope the intake made of it (same id and ts; FINAL keeps the envelope)."""
    conversation = f"conv-dup-{ids.uuid7()}"
    rows = rows_for(conversation, 4)
    insert_rows(client, rows)
    insert_rows(client, rows[::-1])  # regrouped: a new insert token, every row lands twice
    assert count(client, conversation) == 8
    assert trace_ids(ro, conversation) == [r[0] for r in rows]

    ns = 1_795_000_000_987_654_321
    seq = int(uuid.uuid4().int % 1_000_000_000)
    raw = envelope_row(
        f'{{"prompt": "hi", "conversation_id": "{conversation}-plain"}}'.encode(),
        subject="bl.task.x",
        stream="BL_TASKS",
        stream_seq=seq,
        stream_ts_ns=ns,
        max_message_bytes=1000,
    )
    env = Envelope(
        id=raw[0],
        kind=Kind.TASK,
        sender="client",
        recipient="agent",
        conversation_id=f"{conversation}-plain",
        ts=datetime.fromtimestamp(ns / 1e9, UTC),
        payload=TaskPayload(prompt="hi"),
    )
    insert_rows(client, stored([env], stream="BL_MAILBOX"))
    insert_rows(client, [raw])
    for key in (raw[0], f"{conversation}-plain"):
        answer = run_readonly(ro, TRACE_SQL, {"id": key}).rows
        assert [(r[0], r[1]) for r in answer] == [(raw[0], "task")], key


def test_the_trace_query_returns_a_long_trace_whole(
    client: storage.Client, ro: storage.Client
) -> None:
    """A trace over 40 days (two months, so two partitions of both tables), recorded in
    separate batches, newest first, with other messages between: all of it, in time order."""
    now = datetime.now(UTC) - timedelta(hours=1)
    conversation = f"conv-long-{ids.uuid7()}"
    task = Envelope(
        kind=Kind.TASK,
        sender="user",
        recipient="agent",
        conversation_id=conversation,
        ts=now - timedelta(days=40),
        payload=TaskPayload(prompt="q"),
    )
    steps = [task] + [
        task.child(
            ReplyPayload(task_id=task.id, text=f"r{d}"),
            sender="agent",
            recipient="user",
            ts=now - timedelta(days=d),
        )
        for d in (39, 20, 0)
    ]
    for e in reversed(steps):
        between = rows_for(f"conv-between-{ids.uuid7()}", 3)
        insert_rows(client, [*stored([e]), *between])
    parts = client.query(
        f"SELECT count() FROM {MESSAGES_ID_TS_TABLE} WHERE key = {{k:String}}",
        parameters={"k": task.trace_id},
    ).result_rows[0][0]
    assert parts >= 2  # the range is min/max over several rows of the lookup table
    for key in (conversation, task.trace_id):
        assert trace_ids(ro, key) == [e.id for e in steps]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_values_are_only_values(
    client: storage.Client, ro: storage.Client, hostile: str
) -> None:
    conversation = f"conv-hostile-{ids.uuid7()}"
    insert_rows(client, rows_for(conversation, 2))
    assert run_readonly(ro, TRACE_SQL, {"id": hostile}).rows == []
    assert run_readonly(ro, TRACE_BY_TRACE_SQL, {"id": hostile}).rows == []
    answer = run_readonly(
        ro, "SELECT id FROM bl_messages WHERE conversation_id = {c:String}", {"c": hostile}
    )
    assert answer.rows == [] and answer.columns == ["id"] and answer.types == ["String"]
    assert count(client, conversation, final=True) == 2  # nothing dropped


# --- the read-only path ----------------------------------------------------------------


def test_readonly_answers_reads(client: storage.Client, ro: storage.Client) -> None:
    insert_rows(client, rows_for("conv-ro", 2))
    r = run_readonly(
        ro,
        "SELECT kind, count() AS n, max(ts) AS last FROM bl_messages FINAL"
        " WHERE conversation_id = {c:String} GROUP BY kind ORDER BY kind",
        {"c": "conv-ro"},
    )
    assert r.columns == ["kind", "n", "last"]
    assert r.types[1] == "UInt64" and r.types[2].startswith("DateTime64")
    assert [row[:2] for row in r.rows] == [["reply", 1], ["task", 1]]
    assert r.rows[0][2].endswith("Z")  # ISO 8601 text
    for sql in (
        "DESCRIBE TABLE bl_messages",
        "SHOW TABLES",
        "WITH 1 AS x SELECT x",
        "  -- comment\n select 1",
    ):
        run_readonly(ro, sql)


@pytest.mark.parametrize(
    ("sql", "parameters", "why"),
    [
        ("INSERT INTO bl_messages (id) VALUES ('x')", None, "only SELECT"),
        ("DROP TABLE bl_messages", None, "only SELECT"),
        ("ALTER TABLE bl_messages DELETE WHERE 1", None, "only SELECT"),
        ("SET readonly = 0", None, "only SELECT"),
        ("SELECT 1; DROP TABLE bl_messages", None, "exactly one statement"),
        ("SELECT 1;;SELECT 2", None, "exactly one statement"),
        ("SELECT 'a", None, "unclosed"),
        ("SELECT 1 /* x", None, "unclosed"),
        ("", None, "non-empty"),
        (None, None, "non-empty"),
        ("SELECT %(x)s", {"x": "1"}, "not used as a"),
        ("SELECT {x:String}", None, "without a value"),
        ("SELECT {x:String}", {"x": "1", "y": "2"}, "'y' is not used"),
        ("SELECT {x:String}", ["x"], "JSON object"),
        ("SELECT 1", {"bad name": 1}, "not valid"),
    ],
)
def test_rejected_before_clickhouse(sql: Any, parameters: Any, why: str) -> None:
    with pytest.raises(CallerError, match=why) as info:
        check_readonly_sql(sql, parameters)
    assert info.value.reason == Reason.QUERY_REJECTED


def test_semicolons_in_strings_and_comments_are_one_statement() -> None:
    sql, _ = check_readonly_sql("SELECT ';' -- ; \n ;")
    assert sql == "SELECT ';' -- ;\n"


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO bl_messages (id) VALUES ('x')",
        "DROP TABLE bl_messages",
        "SELECT 1 SETTINGS readonly = 0",
        "SELECT 1 SETTINGS max_result_rows = 0",
        "SELECT * FROM file('/etc/hostname', 'LineAsString')",
        "SELECT * FROM url('http://127.0.0.1:9/', 'LineAsString')",
    ],
)
def test_chdb_enforces_readonly_itself(
    client: storage.Client, ro: storage.Client, sql: str
) -> None:
    """Bypassing the statement check, the session's readonly=1 still refuses (verified)."""
    with pytest.raises(DatabaseError, match=r"readonly|READONLY"):
        ro.query(sql).result_rows  # noqa: B018
    assert client.query("EXISTS TABLE bl_messages").result_rows[0][0] == 1


def test_limits_rows_and_time(ro: storage.Client) -> None:
    with pytest.raises(DatabaseError, match=r"TOO_MANY_ROWS|Limit for result"):
        run_readonly(ro, "SELECT number FROM numbers(1000)")
    started = time.monotonic()
    with pytest.raises(DatabaseError, match=r"TIMEOUT|imeout"):
        run_readonly(ro, "SELECT count() FROM numbers(1000000000000) WHERE sipHash64(number) = 0")
    assert time.monotonic() - started < 10


# --- connecting ------------------------------------------------------------------------


def test_connect_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="chdb://PATH"):
        storage.connect("postgres://x")
    port = free_port()
    with pytest.raises(TransientError, match="unavailable") as info:
        storage.connect(f"http://default:s3cret@127.0.0.1:{port}/default", timeout_s=2)
    assert info.value.reason == Reason.STORAGE_UNAVAILABLE
    assert "s3cret" not in str(info.value)
    assert storage.classify(info.value) == Reason.STORAGE_UNAVAILABLE


def test_redact_url() -> None:
    assert storage.redact_url("http://u:pw@h:8123/db") == "http://u:***@h:8123/db"
    assert storage.redact_url("chdb:///data/ch") == "chdb:///data/ch"
    assert ids.derived_id("BL_TASKS", "1") != ids.derived_id("BL_TASKS", "2")
