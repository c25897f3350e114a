"""Messages into batches, batches into ClickHouse, and only then acks.

Each message becomes a row: orjson plus a structural check, no pydantic. Rows collect in a
Batch that is inserted when it holds `batch_size` messages or its oldest message is
`flush_interval_ms` old. While one batch is inserted (in a worker thread) the next one
fills. After the insert (messages, then the spans built from them, `beamline.spans`), every message
of the batch is acked.

Failure: an insert that fails holds its messages unacked. The flusher retries with capped
exponential backoff and jitter, tells JetStream it is still working on them (+WPI) so they
are not redelivered meanwhile, and the pullers stop asking when the next batch is full.
Nothing is acked that ClickHouse has not stored. Stopping while ClickHouse still fails gives
the messages back (-NAK) once `stop_timeout_s` is spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from clickhouse_connect.driver.exceptions import OperationalError
from nats.aio.client import Client as NATS

from beamline import rows, storage
from beamline.backoff import backoff
from beamline.errors import Reason
from services.recorder.batch import Batch
from services.recorder.health import Health, first_line
from services.recorder.puller import AckMeta
from services.recorder.settings import RecorderSettings
from services.recorder.store import Store, WriteResult

log = logging.getLogger("beamline.recorder")


class Flusher:
    """Owns the open batch, the batch being inserted, and the stop state the pullers and
    retry waits look at. `pump` asks every puller for more once a batch is taken."""

    def __init__(
        self,
        nc: NATS,
        cfg: RecorderSettings,
        max_message_bytes: int,
        store: Store,
        health: Health,
        pump: Callable[[], Awaitable[None]],
        on_spans: Callable[[list[list[Any]]], None] | None = None,
    ) -> None:
        self.nc = nc
        self.cfg = cfg
        self.max_message_bytes = max_message_bytes
        self.store = store
        self.health = health
        self.pump = pump
        self.on_spans = on_spans  # the stored spans, for a copy elsewhere (OTLP export)
        self.batch: Batch[str] = self._new_batch()  # rows + reply subjects to ack
        self.inflight: Batch[str] | None = None
        self.stopping = False
        self._drained = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._stop_deadline = float("inf")

    # --- state -------------------------------------------------------------------------

    @property
    def backlogged(self) -> bool:
        return self.batch.full

    def paused(self) -> bool:
        """Ask for no more messages: stopping, or the open batch is full."""
        return self.stopping or self.backlogged

    @property
    def pending(self) -> int:
        return len(self.batch) + (len(self.inflight) if self.inflight else 0)

    def begin_stop(self) -> None:
        """Stop retrying beyond `stop_timeout_s` from now; end waits for ClickHouse."""
        self.stopping = True
        self._stop_deadline = time.monotonic() + self.cfg.stop_timeout_s
        self._stop_event.set()

    def drained(self) -> None:
        """No more messages will arrive: store what is held, then `run` returns."""
        self._drained.set()
        self._wake.set()

    def _new_batch(self) -> Batch[str]:
        return Batch(self.cfg.batch_size, self.cfg.flush_interval_ms / 1000)

    # --- hot path ----------------------------------------------------------------------

    def accept(
        self,
        subject: str,
        reply: str,
        data: bytes,
        headers: dict[str, str] | None,
        meta: AckMeta,
        stream: str,
    ) -> None:
        _, delivered, seq, ts_ns = meta
        where: dict[str, Any] = {
            "subject": subject,
            "stream": stream,
            "stream_seq": seq,
            "stream_ts_ns": ts_ns,
            "max_message_bytes": self.max_message_bytes,
            "headers": headers,
        }
        try:
            row = rows.envelope_row(data, **where)
        except Exception:  # a bug in the row builder must not lose the message
            log.exception("could not build a row; recording the message as raw", extra=where)
            row = rows.raw_row(data, Reason.INVALID_SCHEMA.value, **where)
        batch = self.batch
        batch.add(row, reply, time.monotonic(), redelivered=delivered > 1)
        if batch.full or len(batch.msgs) == 1:
            self._wake.set()  # full: flush now; first message: start the age clock

    async def run(self) -> None:
        """Insert each batch when it is due; return once drained and empty."""
        while True:
            now = time.monotonic()
            batch = self.batch
            if batch.empty:
                if self._drained.is_set():
                    return
                timeout: float | None = None
            elif batch.due(now) or self._drained.is_set():
                self.batch = self._new_batch()
                self.inflight = batch
                await self.pump()
                await self._store(batch)
                self.inflight = None
                continue
            else:
                timeout = batch.time_left(now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    # --- insert, then ack --------------------------------------------------------------

    async def _store(self, batch: Batch[str]) -> None:
        result = await self._insert_until_stored(batch)
        if result is None:
            return  # given back to JetStream
        self._count(batch, result)
        if self.cfg.crash_after_insert:
            log.warning("fault injection: exiting after the insert, before the ack")
            logging.shutdown()
            os._exit(137)
        await self._ack(batch.msgs, b"")
        self.health.acked += len(batch.msgs)
        if self.on_spans and result.span_rows:
            self.on_spans(result.span_rows)  # after the ack: a copy must never delay it

    async def _insert_until_stored(self, batch: Batch[str]) -> WriteResult | None:
        """Insert with backoff until ClickHouse takes the batch; None when stopping gave it
        back. After `max_redeliveries` refusals, isolate the rows ClickHouse refuses."""
        attempt = 0
        last_keepalive = time.monotonic()
        isolate = False
        while True:
            try:
                return await asyncio.to_thread(self.store.write, batch, isolate)
            except Exception as exc:
                attempt += 1
                self.health.record_error(exc)
                batch.mark_uncertain()  # a failed insert may have landed: check ids next time
                unavailable = isinstance(exc, OperationalError | OSError) or (
                    storage.classify(exc) == Reason.STORAGE_UNAVAILABLE
                )
                isolate = attempt >= self.cfg.max_redeliveries and not unavailable
                delay = backoff(attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
                log.error(
                    f"insert of {len(batch.rows)} rows into ClickHouse failed; their "
                    f"{len(batch)} messages stay unacked in JetStream and the insert is "
                    f"retried in {delay:.1f}s. Check that ClickHouse is up and writable "
                    "(BEAMLINE_CLICKHOUSE_URL, disk space); nothing is lost meanwhile",
                    extra=self._error_extra(exc, attempt),
                )
                now = time.monotonic()
                if self.stopping and now + delay > self._stop_deadline:
                    await self._give_back(batch)
                    return None
                if now - last_keepalive >= self.cfg.ack_wait_s / 3:
                    await self._keep_alive(batch)
                    last_keepalive = now
                with contextlib.suppress(TimeoutError):
                    wait = self._stop_event.wait() if not self.stopping else asyncio.sleep(delay)
                    await asyncio.wait_for(wait, delay)

    def _count(self, batch: Batch[str], result: WriteResult) -> None:
        health = self.health
        if health.failures:
            log.info(
                "ClickHouse insert succeeded again",
                extra={"after_failures": health.failures, "storage": self.store.name},
            )
        health.failures = 0
        health.batches += 1
        health.rows_recorded += result.inserted
        health.spans_recorded += result.spans
        health.duplicates_skipped += result.skipped
        health.poison_rows += result.poisoned
        health.raw_rows += sum(1 for r in batch.rows if r[rows.KIND] == rows.KIND_RAW)

    async def _ack(self, replies: Sequence[str], body: bytes) -> int:
        failed = 0
        publish = self.nc.publish
        for reply in replies:
            try:
                await publish(reply, body)
            except Exception:
                failed += 1
        if failed:
            self.health.ack_failures += failed
            log.warning(
                "some acks could not be sent; those messages will be redelivered and "
                "de-duplicated against the table",
                extra={"failed": failed, "body": body.decode()},
            )
        return failed

    async def _keep_alive(self, held: Batch[str]) -> None:
        """+WPI: reset ack_wait for messages held while ClickHouse is failing."""
        await self._ack(held.msgs, b"+WPI")
        await self._ack(self.batch.msgs, b"+WPI")

    async def _give_back(self, batch: Batch[str]) -> None:
        """Stopping while ClickHouse fails: nak so that another recorder gets them now."""
        log.error(
            "stopping with an unstored batch: its messages go back to JetStream (nak)",
            extra={"messages": len(batch), "storage": self.store.name},
        )
        await self._ack(batch.msgs, b"-NAK")
        await self._ack(self.batch.msgs, b"-NAK")
        self.batch = self._new_batch()

    # --- storage start-up --------------------------------------------------------------

    async def connect_storage(self) -> None:
        """Connect and migrate before the first batch, retrying until ClickHouse answers."""
        attempt = 0
        while not self.stopping and not self.store.connected:
            try:
                await asyncio.to_thread(self.store.writer)
                log.info("storage ready", extra={"storage": self.store.name})
                return
            except Exception as exc:
                attempt += 1
                self.health.record_error(exc)
                delay = backoff(attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
                log.error(
                    f"cannot connect to ClickHouse; retrying in {delay:.1f}s. Check that it "
                    "runs and that BEAMLINE_CLICKHOUSE_URL points at it; messages wait in "
                    "JetStream meanwhile",
                    extra=self._error_extra(exc, attempt),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), delay)

    def _error_extra(self, exc: BaseException, attempt: int) -> dict[str, Any]:
        return {
            "storage": self.store.name,
            "error": first_line(exc, 1000),
            "attempt": attempt,
            "pending": self.pending,
        }
