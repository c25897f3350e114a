"""The recorder's ClickHouse clients: de-duplicated batch inserts, poison-row isolation, and
read-only queries. Methods block: call them from a worker thread.

Duplicates cannot arise: each insert carries a de-duplication token (sha256 of its ids), and
rows of redelivered messages (or of a retried batch) whose ids are already stored are
dropped first. A client whose call failed is closed and replaced on the next call.

Spans (`beamline.spans`) go into otel_traces in the same write, after the messages and
before the caller acks: built from the batch's rows before the drop (an attempt that stored
the messages but not the spans is completed by the retry), without the span ids already
stored (looked up for redelivered rows and for task outcomes, which arrive from two streams),
with a token of their own. Only llm_response, summary, tool_result, reply and error rows
give spans.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError

from beamline import readonly, rows, spans, storage
from beamline.errors import CallerError
from services.recorder.batch import Batch
from services.recorder.health import first_line
from services.recorder.settings import RecorderSettings
from services.recorder.span_memory import SpanMemory

log = logging.getLogger("beamline.recorder")

ClientFactory = Callable[..., Client]
_STREAM = rows.COLUMNS.index("stream")
_STREAM_SEQ = rows.COLUMNS.index("stream_seq")


@dataclass
class WriteResult:
    inserted: int
    skipped: int  # rows whose ids were already stored
    poisoned: int = 0
    spans: int = 0  # otel_traces rows inserted
    span_rows: list[list[Any]] = field(default_factory=list)  # those rows (for OTLP export)


class Store:
    """A writer client (inserts, id look-ups; used by one task at a time) and a read-only
    reader client (bl.query.sql). Clients are created lazily, so a ClickHouse that is down
    at start is retried instead of crashing the process."""

    def __init__(
        self,
        url: str,
        cfg: RecorderSettings,
        max_message_bytes: int,
        connect: ClientFactory = storage.connect,
    ) -> None:
        self.url = url
        self.cfg = cfg
        self.max_message_bytes = max_message_bytes
        self._connect = connect
        self._writer: Client | None = None
        self._reader: Client | None = None
        self._lock = threading.Lock()
        self.span_memory = SpanMemory()

    @property
    def connected(self) -> bool:
        return self._writer is not None

    @property
    def name(self) -> str:
        """The URL without its password, for logs and health answers."""
        return storage.redact_url(self.url)

    def writer(self) -> Client:
        with self._lock:
            if self._writer is None:
                client = self._connect(self.url)
                try:
                    storage.migrate(client)
                except BaseException:
                    with contextlib.suppress(Exception):
                        client.close()
                    raise
                self._writer = client
            return self._writer

    def reader(self) -> Client:
        self.writer()  # the schema exists before anything reads it
        with self._lock:
            if self._reader is None:
                self._reader = self._connect(
                    self.url,
                    readonly.readonly_settings(self.cfg.query_timeout_s, self.cfg.query_max_rows),
                )
            return self._reader

    def write(self, batch: Batch[Any], isolate: bool = False) -> WriteResult:
        client = self.writer()
        try:
            return self._write(client, batch, isolate)
        except Exception:
            self._discard("_writer", client)
            raise

    def query(self, sql: Any, parameters: Any) -> readonly.QueryResult:
        client = self.reader()
        try:
            return readonly.run_readonly(client, sql, parameters)
        except CallerError:
            raise  # refused before it reached ClickHouse
        except Exception:
            self._discard("_reader", client)
            raise

    def close(self) -> None:
        with self._lock:
            for client in (self._reader, self._writer):
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()
            self._reader = self._writer = None

    def _discard(self, attr: str, client: Client) -> None:
        """Drop a client after a failed call; the next call opens a fresh one. chDB keeps the
        partial output of a query that failed mid-way in its handle and prepends it to the
        next answer (chDB 4.4), and an HTTP client gets a clean session."""
        with self._lock:
            if getattr(self, attr) is client:
                setattr(self, attr, None)
        with contextlib.suppress(Exception):
            client.close()

    def _write(self, client: Client, batch: Batch[Any], isolate: bool) -> WriteResult:
        """Messages first, then their spans; an exception from either leaves the batch
        unacked, and the retry looks up what the failed attempt may have stored."""
        skipped = 0
        batch_rows = batch.rows  # before the drop: spans of stored rows may still be missing
        check = batch.redelivered_ids()
        if check:
            skipped = batch.drop(rows.stored_ids(client, check))
        if not batch.rows:
            result = WriteResult(0, skipped)
        elif not isolate:
            rows.insert_rows(client, batch.rows, batch.token)
            result = WriteResult(len(batch.rows), skipped)
        else:
            inserted, poisoned = self._insert_isolating(client, batch.rows)
            result = WriteResult(inserted, skipped, poisoned)
        plan = spans.plan(batch_rows)
        if plan:
            result.span_rows = self._write_spans(client, plan, check, isolate)
            result.spans = len(result.span_rows)
        return result

    def _write_spans(
        self, client: Client, plan: spans.Plan, redelivered: Sequence[str], isolate: bool
    ) -> list[list[Any]]:
        """The spans of a batch into otel_traces, without those already stored: the rows
        inserted."""
        memory = self.span_memory
        memory.remember_tasks(plan.tasks)
        maybe = plan.may_be_stored(frozenset(redelivered))
        plan.without({s for s in maybe if memory.written(s)})
        unknown = [s for s in maybe if not memory.written(s)]
        if unknown and (redelivered or memory.young()):
            plan.without(stored_span_ids(client, unknown))
        if not plan:
            return []
        missing = plan.missing_tasks()
        starts = memory.task_starts(missing)
        ask = [t for t in missing if t not in starts]
        if ask:
            starts.update(task_starts(client, ask))
        span_rows = spans.build(plan, starts or None)
        try:
            insert_spans(client, span_rows)
        except (OperationalError, OSError):
            raise
        except Exception as exc:
            if not isolate:
                raise
            # spans are derived data: once ClickHouse has refused them max_redeliveries
            # times while reachable, they must not hold the messages back forever
            log.error(
                "ClickHouse refused the spans of a batch; its messages are stored and acked "
                "without them",
                extra={"spans": len(span_rows), "error": first_line(exc)},
            )
            return []
        memory.remember_written(span_rows)
        return span_rows

    def _insert_isolating(self, client: Client, batch_rows: Sequence[list[Any]]) -> tuple[int, int]:
        """Insert by halves until the rows ClickHouse refuses are alone; store each of those
        as a raw `poison` row. A failure that is not about a row propagates."""
        try:
            rows.insert_rows(client, batch_rows)
            return len(batch_rows), 0
        except (OperationalError, OSError):
            raise
        except Exception as exc:
            if len(batch_rows) == 1:
                self._store_poison(client, batch_rows[0], exc)
                return 1, 1
            mid = len(batch_rows) // 2
            a_ins, a_poi = self._insert_isolating(client, batch_rows[:mid])
            b_ins, b_poi = self._insert_isolating(client, batch_rows[mid:])
            return a_ins + b_ins, a_poi + b_poi

    def _store_poison(self, client: Client, row: list[Any], exc: Exception) -> None:
        rows.insert_rows(client, [rows.poison_row(row, self.max_message_bytes)])
        log.error(
            "ClickHouse refused a row; stored it as kind raw, reason poison",
            extra={
                "envelope_id": row[rows.ID],
                "stream": row[_STREAM],
                "stream_seq": row[_STREAM_SEQ],
                "error": first_line(exc),
            },
        )


# --- otel_traces -------------------------------------------------------------------------


def insert_spans(client: Client, span_rows: Sequence[Sequence[Any]]) -> int:
    """Insert span rows (spans.COLUMNS order), de-duplicated by a token of their span ids."""
    if not span_rows:
        return 0
    client.insert(
        spans.TRACES_TABLE,
        [list(col) for col in zip(*span_rows, strict=True)],
        column_names=spans.COLUMNS,
        column_type_names=spans.COLUMN_TYPES,
        column_oriented=True,
        settings={"insert_deduplication_token": spans.dedup_token(span_rows)},
    )
    return len(span_rows)


def stored_span_ids(client: Client, span_ids: Sequence[str]) -> set[str]:
    """Which of these span ids otel_traces already holds (one parameterized query)."""
    result = client.query(
        f"SELECT DISTINCT SpanId FROM {spans.TRACES_TABLE} WHERE SpanId IN {{ids:Array(String)}}",
        parameters={"ids": list(span_ids)},
    )
    return {str(r[0]) for r in result.result_rows}


def task_starts(client: Client, task_ids: Sequence[str]) -> dict[str, spans.TaskStart]:
    """The recorded start (ts, µs) and parent span of these tasks (one parameterized query);
    a plain task's raw row has the same id and ts as its envelope, the envelope wins."""
    result = client.query(
        f"SELECT id, toUnixTimestamp64Micro(argMax(ts, kind = 'task')),"
        f" argMax(parent_span_id, kind = 'task') FROM {rows.MESSAGES_TABLE}"
        " WHERE id IN {ids:Array(String)} AND kind IN ('task', 'raw') GROUP BY id",
        parameters={"ids": list(task_ids)},
    )
    return {str(r[0]): spans.TaskStart(int(r[1]), str(r[2])) for r in result.result_rows}
