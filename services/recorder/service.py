"""The recorder: every message of every recorded stream into ClickHouse, acked only once stored.

Hot path: one durable pull consumer `recorder` per stream, driven by raw pull requests into a
core-NATS inbox. The messages arrive in a callback, as fast as a push consumer, and the
recorder asks only for what it can hold. Each message becomes a row: orjson plus a
structural check, no pydantic. Rows collect in a Batch that is inserted when it holds
`batch_size` messages or its oldest message is `flush_interval_ms` old. While one batch is
inserted (in a worker thread) the next one fills. After the insert, every message of the
batch is acked.

Failure: an insert that fails holds its messages unacked. The recorder retries with capped
exponential backoff and jitter, tells JetStream it is still working on them (+WPI) so they
are not redelivered meanwhile, and stops pulling when the next batch is full. Nothing is
acked that ClickHouse has not stored. Duplicates cannot arise: each insert carries a
de-duplication token (sha256 of its ids), and rows of redelivered messages (or of a retried
batch) whose ids are already stored are dropped first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from beamline import bus, storage, streams, subjects
from beamline.errors import CallerError, ConfigError, Reason
from beamline.service import answer_health
from beamline.settings import MeshSettings
from services.recorder import fastpath
from services.recorder.batch import Batch
from services.recorder.settings import RecorderSettings

SERVICE = "recorder"
CONSUMER_CHECK_S = 30.0  # how often the consumers are re-declared (idempotent)
STARTUP_STORAGE_WAIT_S = 10.0  # at start, wait this long for ClickHouse before going on
log = logging.getLogger("beamline.recorder")

ClientFactory = Callable[..., Client]


def parse_ack_reply(reply: str) -> tuple[str, int, int, int] | None:
    """(stream, num_delivered, stream_seq, timestamp ns) from a JetStream ack subject.

    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>` or the
    domain-qualified v2 form `$JS.ACK.<domain>.<account>.<stream>...` (11+ tokens)."""
    t = reply.split(".")
    if len(t) < 9 or t[0] != "$JS" or t[1] != "ACK":
        return None
    o = 2 if len(t) == 9 else 4
    try:
        return t[o], int(t[o + 2]), int(t[o + 3]), int(t[o + 5])
    except (IndexError, ValueError):
        return None


def backoff(attempt: int, initial: float, cap: float) -> float:
    """Capped exponential backoff with jitter: in [d/2, d] for d = min(cap, initial*2^n)."""
    delay = min(cap, initial * float(1 << min(max(attempt, 1) - 1, 30)))
    return delay * random.uniform(0.5, 1.0)


def _first_line(exc: BaseException, limit: int = 500) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:limit]


@dataclass
class WriteResult:
    inserted: int
    skipped: int  # rows whose ids were already stored
    poisoned: int = 0


class Store:
    """ClickHouse access for the recorder: a writer client (inserts, id look-ups; used by one
    task at a time) and a read-only reader client (bl.query.sql). Methods block: call them
    from a worker thread. Clients are created lazily, so a ClickHouse that is down at start
    is retried instead of crashing the process."""

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

    @property
    def connected(self) -> bool:
        return self._writer is not None

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
                    storage.readonly_settings(self.cfg.query_timeout_s, self.cfg.query_max_rows),
                )
            return self._reader

    def write(self, batch: Batch[Any], isolate: bool = False) -> WriteResult:
        client = self.writer()
        try:
            return self._write(client, batch, isolate)
        except Exception:
            self._discard("_writer", client)
            raise

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
        skipped = 0
        check = batch.redelivered_ids()
        if check:
            skipped = batch.drop(storage.stored_ids(client, check))
        if not batch.rows:
            return WriteResult(0, skipped)
        if not isolate:
            storage.insert_rows(client, batch.rows, batch.token)
            return WriteResult(len(batch.rows), skipped)
        inserted, poisoned = self._insert_isolating(client, batch.rows)
        return WriteResult(inserted, skipped, poisoned)

    def _insert_isolating(self, client: Client, rows: Sequence[list[Any]]) -> tuple[int, int]:
        """Insert by halves until the rows ClickHouse refuses are alone; store each of those
        as a raw `poison` row. A failure that is not about a row propagates."""
        try:
            storage.insert_rows(client, rows)
            return len(rows), 0
        except (OperationalError, OSError):
            raise
        except Exception as exc:
            if len(rows) == 1:
                storage.insert_rows(client, [storage.poison_row(rows[0], self.max_message_bytes)])
                log.error(
                    "ClickHouse refused a row; stored it as kind raw, reason poison",
                    extra={
                        "envelope_id": rows[0][storage.ID],
                        "stream": rows[0][storage.COLUMNS.index("stream")],
                        "stream_seq": rows[0][storage.COLUMNS.index("stream_seq")],
                        "error": _first_line(exc),
                    },
                )
                return 1, 1
            mid = len(rows) // 2
            a_ins, a_poi = self._insert_isolating(client, rows[:mid])
            b_ins, b_poi = self._insert_isolating(client, rows[mid:])
            return a_ins + b_ins, a_poi + b_poi

    def query(self, sql: Any, parameters: Any) -> storage.QueryResult:
        client = self.reader()
        try:
            return storage.run_readonly(client, sql, parameters)
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


class Puller:
    """Pull requests for one stream's `recorder` consumer, answered into one inbox.

    Credit = messages asked for and not yet received. Ask for `fetch_batch - credit` when
    credit falls to half; forget credit when the last request expired or the connection was
    re-established (the server forgot the requests). Over-asking is harmless:
    max_ack_pending bounds what the server delivers."""

    def __init__(self, rec: Recorder, stream: str) -> None:
        self.rec = rec
        self.stream = stream
        self.api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{subjects.CONSUMER_RECORDER}"
        self.inbox = ""
        self.sub: Subscription | None = None
        self.credit = 0
        self.deadline = 0.0
        self.reconnects = 0
        self.low_water = max(1, rec.cfg.fetch_batch // 2)

    async def start(self) -> None:
        self.inbox = self.rec.nc.new_inbox()
        self.sub = await self.rec.nc.subscribe(
            self.inbox, cb=self.on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )

    async def on_msg(self, msg: Msg) -> None:
        """Deliveries (they have a reply subject to ack) and status messages."""
        if msg.reply:
            await self.deliver(msg.subject, msg.reply, msg.data, msg.headers)
        else:
            self.on_status(msg)

    async def deliver(
        self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None
    ) -> None:
        meta = parse_ack_reply(reply)
        if meta is None:
            log.warning(
                "a message with an unexpected reply subject cannot be acked; skipped",
                extra={"stream": self.stream, "subject": subject, "reply": reply},
            )
            return
        self.credit -= 1
        self.rec.accept(subject, reply, data, headers, meta, self.stream)
        if self.credit <= self.low_water:
            await self.pump()

    def on_status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status in ("404", "408", "409"):
            pending = headers.get("Nats-Pending-Messages")
            if pending and pending.isdigit():
                self.credit = max(0, self.credit - int(pending))
            else:
                self.credit = 0
            if status == "409":
                description = str(headers.get("Description", ""))
                level = logging.WARNING if "Deleted" in description else logging.DEBUG
                log.log(
                    level, "pull request ended", extra={"stream": self.stream, "why": description}
                )
                if "Deleted" in description:
                    self.rec.spawn(self.rec.ensure_consumer(self.stream))

    async def pump(self) -> None:
        """Ask for more if there is room and no live request covers it."""
        rec = self.rec
        if rec.stopping or rec.backlogged or self.sub is None:
            return
        now = time.monotonic()
        reconnects = int(rec.nc.stats.get("reconnects", 0))
        if now >= self.deadline or reconnects != self.reconnects:
            self.credit, self.reconnects = 0, reconnects
        if self.credit > self.low_water or not rec.nc.is_connected:
            return
        want = rec.cfg.fetch_batch - max(0, self.credit)
        expires = rec.cfg.pull_expires_s
        body = orjson.dumps({"batch": want, "expires": int(expires * 1e9)})
        try:
            await rec.nc.publish(self.api, body, reply=self.inbox)
        except Exception as exc:  # disconnected: the tick asks again
            log.debug("pull request not sent", extra={"stream": self.stream, "error": repr(exc)})
            return
        self.credit += want
        self.deadline = now + expires

    async def drain(self) -> None:
        if self.sub is not None:
            sub, self.sub = self.sub, None
            try:
                await asyncio.wait_for(sub.drain(), 5)  # type: ignore[no-untyped-call]
            except Exception as exc:
                log.debug("inbox drain failed", extra={"stream": self.stream, "error": repr(exc)})
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


class Recorder:
    def __init__(
        self,
        nc: NATS,
        cfg: RecorderSettings,
        mesh: MeshSettings,
        store: Store,
        streams_: Sequence[str] = subjects.RECORDED_STREAMS,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.cfg = cfg
        self.mesh = mesh
        self.store = store
        self.streams = tuple(streams_)
        self.pullers = {s: Puller(self, s) for s in self.streams}
        self.batch: Batch[str] = self._new_batch()  # rows + reply subjects to ack
        self.inflight: Batch[str] | None = None
        self.stopping = False
        self._drained = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._stop_deadline = float("inf")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subs: list[Subscription] = []
        self._query_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        # counters for health
        self.rows_recorded = 0
        self.raw_rows = 0
        self.poison_rows = 0
        self.duplicates_skipped = 0
        self.batches = 0
        self.acked = 0
        self.ack_failures = 0
        self.failures = 0  # consecutive failed inserts
        self.last_error: str | None = None
        self.last_error_at: str | None = None
        self.queries = 0

    # --- lifecycle ---------------------------------------------------------------------

    def _new_batch(self) -> Batch[str]:
        return Batch(self.cfg.batch_size, self.cfg.flush_interval_ms / 1000)

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ensure_consumer(self, stream: str) -> None:
        """Create the durable pull consumer, or bring it to this config (idempotent)."""
        config = ConsumerConfig(
            name=subjects.CONSUMER_RECORDER,
            durable_name=subjects.CONSUMER_RECORDER,
            description="beamline recorder: every message into ClickHouse bl_messages",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.cfg.ack_wait_s,
            max_ack_pending=self.cfg.max_ack_pending,
            max_deliver=-1,  # never drop a message the recorder has not stored
            max_waiting=512,
        )
        await self.js.add_consumer(stream, config)

    async def _ensure_layout(self) -> None:
        await streams.ensure_streams(self.js, self.mesh.mailbox_shards)
        for stream in self.streams:
            await self.ensure_consumer(stream)

    async def start(self, stop: asyncio.Event | None = None) -> bool:
        """Set up and start recording; False if `stop` was set before the setup succeeded."""
        stop = stop or asyncio.Event()
        attempt = 0
        while True:  # JetStream may still be starting: retry instead of exiting
            try:
                await self._ensure_layout()
                break
            except Exception as exc:
                attempt += 1
                delay = backoff(attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
                log.error(
                    f"cannot set up the JetStream streams and consumers; retrying in "
                    f"{delay:.1f}s. Check that NATS at BEAMLINE_NATS_URL runs with JetStream",
                    extra={"error": _first_line(exc), "attempt": attempt},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return False
        # storage first, when it comes quickly (chDB: ~1 s), so that "answers health" means
        # "records at full speed"; a ClickHouse that is down is retried in the background
        warm = asyncio.ensure_future(asyncio.to_thread(self.store.writer))
        done, _ = await asyncio.wait({warm}, timeout=STARTUP_STORAGE_WAIT_S)
        if not done or warm.exception() is not None:
            warm.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
        self._subs.append(
            await self.nc.subscribe(
                subjects.QUERY, queue=subjects.QUEUE_RECORDER, cb=self._on_query
            )
        )
        self._subs.append(await answer_health(self.nc, SERVICE, self.status))
        for puller in self.pullers.values():
            await puller.start()
        self._flusher = asyncio.create_task(self._flush_loop())
        self._ticker = asyncio.create_task(self._tick_loop())
        self._flusher.add_done_callback(_fatal_on_error)
        self._ticker.add_done_callback(_fatal_on_error)
        self.spawn(self._warm_up())
        log.info(
            "recording",
            extra={
                "streams": list(self.streams),
                "storage": storage.redact_url(self.store.url),
                "batch_size": self.cfg.batch_size,
                "flush_interval_ms": self.cfg.flush_interval_ms,
            },
        )
        return True

    async def stop(self) -> None:
        """Stop pulling, store and ack what was received, then stop answering."""
        self.stopping = True
        self._stop_deadline = time.monotonic() + self.cfg.stop_timeout_s
        self._stop_event.set()
        if self._ticker:
            self._ticker.cancel()
        for puller in self.pullers.values():
            await puller.drain()
        self._drained.set()
        self._wake.set()
        if self._flusher:
            await self._flusher
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.to_thread(self.store.close)
        log.info(
            "recorder stopped",
            extra={"rows_recorded": self.rows_recorded, "batches": self.batches},
        )

    async def _tick_loop(self) -> None:
        next_check = time.monotonic() + CONSUMER_CHECK_S
        while True:
            for puller in self.pullers.values():
                await puller.pump()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CONSUMER_CHECK_S
                self.spawn(self._check_layout())
            await asyncio.sleep(0.05)

    async def _check_layout(self) -> None:
        """Recreate a consumer (or stream) someone deleted; idempotent when all is well."""
        try:
            for stream in self.streams:
                try:
                    await self.ensure_consumer(stream)
                except NotFoundError:
                    log.warning("stream missing; recreating the layout", extra={"stream": stream})
                    await self._ensure_layout()
        except Exception as exc:  # NATS down: the next check tries again
            log.debug("consumer check failed", extra={"error": _first_line(exc)})

    async def _warm_up(self) -> None:
        """Connect and migrate before the first batch, retrying until ClickHouse answers."""
        attempt = 0
        while not self.stopping and not self.store.connected:
            try:
                await asyncio.to_thread(self.store.writer)
                log.info("storage ready", extra={"storage": storage.redact_url(self.store.url)})
                return
            except Exception as exc:
                attempt += 1
                self._record_error(exc)
                delay = backoff(attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
                log.error(
                    f"cannot connect to ClickHouse; retrying in {delay:.1f}s. Check that it "
                    "runs and that BEAMLINE_CLICKHOUSE_URL points at it; messages wait in "
                    "JetStream meanwhile",
                    extra=self._error_extra(exc, attempt),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), delay)

    # --- hot path ----------------------------------------------------------------------

    @property
    def backlogged(self) -> bool:
        return self.batch.full

    def accept(
        self,
        subject: str,
        reply: str,
        data: bytes,
        headers: dict[str, str] | None,
        meta: tuple[str, int, int, int],
        stream: str,
    ) -> None:
        _, delivered, seq, ts_ns = meta
        where: dict[str, Any] = {
            "subject": subject,
            "stream": stream,
            "stream_seq": seq,
            "stream_ts_ns": ts_ns,
            "max_message_bytes": self.mesh.max_message_bytes,
            "headers": headers,
        }
        try:
            row = storage.envelope_row(data, **where)
        except Exception:  # a bug in the row builder must not lose the message
            log.exception("could not build a row; recording the message as raw", extra=where)
            row = storage.raw_row(data, Reason.INVALID_SCHEMA.value, **where)
        batch = self.batch
        batch.add(row, reply, time.monotonic(), redelivered=delivered > 1)
        if batch.full or len(batch.msgs) == 1:
            self._wake.set()  # full: flush now; first message: start the age clock

    async def _flush_loop(self) -> None:
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
                for puller in self.pullers.values():
                    await puller.pump()
                await self._store(batch)
                self.inflight = None
                continue
            else:
                timeout = batch.time_left(now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _store(self, batch: Batch[str]) -> None:
        attempt = 0
        last_keepalive = time.monotonic()
        isolate = False
        while True:
            try:
                result = await asyncio.to_thread(self.store.write, batch, isolate)
                break
            except Exception as exc:
                attempt += 1
                self._record_error(exc)
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
                    return
                if now - last_keepalive >= self.cfg.ack_wait_s / 3:
                    await self._keep_alive(batch)
                    last_keepalive = now
                with contextlib.suppress(TimeoutError):
                    wait = self._stop_event.wait() if not self.stopping else asyncio.sleep(delay)
                    await asyncio.wait_for(wait, delay)
        if self.failures:
            log.info(
                "ClickHouse insert succeeded again",
                extra={"after_failures": self.failures, "storage": self._storage_name},
            )
        self.failures = 0
        self.batches += 1
        self.rows_recorded += result.inserted
        self.duplicates_skipped += result.skipped
        self.poison_rows += result.poisoned
        self.raw_rows += sum(1 for r in batch.rows if r[storage.KIND] == storage.KIND_RAW)
        if self.cfg.crash_after_insert:
            log.warning("fault injection: exiting after the insert, before the ack")
            logging.shutdown()
            os._exit(137)
        await self._ack(batch.msgs, b"")
        self.acked += len(batch.msgs)

    async def _ack(self, replies: Sequence[str], body: bytes) -> int:
        failed = 0
        publish = self.nc.publish
        for reply in replies:
            try:
                await publish(reply, body)
            except Exception:
                failed += 1
        if failed:
            self.ack_failures += failed
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
            extra={"messages": len(batch), "storage": self._storage_name},
        )
        await self._ack(batch.msgs, b"-NAK")
        await self._ack(self.batch.msgs, b"-NAK")
        self.batch = self._new_batch()

    # --- health, errors ----------------------------------------------------------------

    @property
    def _storage_name(self) -> str:
        return storage.redact_url(self.store.url)

    def _record_error(self, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = _first_line(exc)
        self.last_error_at = datetime.now(UTC).isoformat()

    def _error_extra(self, exc: BaseException, attempt: int) -> dict[str, Any]:
        return {
            "storage": self._storage_name,
            "error": _first_line(exc, 1000),
            "attempt": attempt,
            "pending": self.pending,
        }

    @property
    def pending(self) -> int:
        return len(self.batch) + (len(self.inflight) if self.inflight else 0)

    def status(self) -> dict[str, Any]:
        return {
            "ok": self.failures == 0,
            "storage": self._storage_name,
            "storage_connected": self.store.connected,
            "streams": list(self.streams),
            "recorded_rows": self.rows_recorded,
            "raw_rows": self.raw_rows,
            "poison_rows": self.poison_rows,
            "duplicates_skipped": self.duplicates_skipped,
            "batches": self.batches,
            "acked": self.acked,
            "ack_failures": self.ack_failures,
            "pending": self.pending,
            "consecutive_failures": self.failures,
            "last_insert_error": self.last_error,
            "last_insert_error_at": self.last_error_at,
            "queries": self.queries,
        }

    # --- bl.query.sql ------------------------------------------------------------------

    async def _on_query(self, msg: Msg) -> None:
        if msg.reply:
            self.spawn(self._answer_query(msg))

    async def _answer_query(self, msg: Msg) -> None:
        self.queries += 1
        try:
            try:
                body = orjson.loads(msg.data)
            except orjson.JSONDecodeError as exc:
                raise CallerError(
                    'the request is not JSON: send {"sql": "...", "parameters": {...}}',
                    Reason.QUERY_REJECTED,
                ) from exc
            if not isinstance(body, dict):
                raise CallerError(
                    'send a JSON object {"sql": "...", "parameters": {...}}', Reason.QUERY_REJECTED
                )
            sql, parameters = body.get("sql"), body.get("parameters")
            storage.check_readonly_sql(sql, parameters)  # reject early, without the lock
            async with self._query_lock:
                result = await asyncio.to_thread(self.store.query, sql, parameters)
            data = storage.dumps(result.as_dict())
            if len(data) > self.nc.max_payload:
                raise CallerError(
                    f"the result is {len(data)} bytes, over the NATS limit of "
                    f"{self.nc.max_payload}: add a LIMIT or select fewer columns",
                    Reason.QUERY_REJECTED,
                )
        except CallerError as exc:
            data = _error_reply(exc.reason, exc.message)
        except Exception as exc:
            reason = storage.classify(exc)
            log.info("query failed", extra={"reason": reason.value, "error": _first_line(exc)})
            data = _error_reply(reason, str(exc).strip()[:2000])
        with contextlib.suppress(Exception):
            await msg.respond(data)


def _fatal_on_error(task: asyncio.Task[None]) -> None:
    """A core loop that dies is a bug: log it and exit, so a supervisor restarts the
    recorder; JetStream redelivers whatever was not acked (errors.py: bugs crash)."""
    if task.cancelled() or task.exception() is None:
        return
    log.critical("recorder loop failed; exiting", exc_info=task.exception())
    logging.shutdown()
    os._exit(70)


def _error_reply(reason: Reason, message: str) -> bytes:
    return orjson.dumps({"error": {"reason": reason.value, "message": message}})


def load_settings() -> tuple[MeshSettings, RecorderSettings]:
    try:
        mesh, cfg = MeshSettings(), RecorderSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"setting {where}: {first['msg']}") from exc
    storage.migrations()  # a missing schema directory is a configuration error
    return mesh, cfg


async def main(stop: asyncio.Event) -> None:
    mesh, cfg = load_settings()
    for noisy in ("urllib3", "clickhouse_connect"):  # our error lines carry their cause
        logging.getLogger(noisy).setLevel(logging.ERROR)
    nc = await bus.connect(mesh.nats_url, SERVICE)
    fastpath.install(nc)  # nats-py's header parser was the hot path's largest cost
    store = Store(mesh.resolved_clickhouse_url, cfg, mesh.max_message_bytes)
    recorder = Recorder(nc, cfg, mesh, store)
    try:
        if await recorder.start(stop):
            await stop.wait()
            await recorder.stop()
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
        with contextlib.suppress(Exception):
            await nc.close()
