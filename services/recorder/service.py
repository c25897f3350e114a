"""The recorder: every message of every recorded stream into ClickHouse, acked only once stored.

This module is the shell: it checks that the streams exist (`beamline init` declares
them), declares its consumers, wires the parts together, and starts and stops them. The
parts, one job each:

- `puller`: one durable pull consumer `recorder` per stream, driven by raw pull requests
  into a core-NATS inbox, asking only for what the recorder can hold;
- `flusher`: messages into rows and batches, batches into ClickHouse, and only then acks
  (backoff and +WPI while ClickHouse fails);
- `store`: the ClickHouse clients (de-duplicated inserts, poison-row isolation, recycling
  a client after a failure);
- `query`: the read-only `bl.query.sql` endpoint;
- `otlp`: optionally, a copy of the stored spans to an OTLP endpoint, best effort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from beamline import bus, nats_auth, storage, streams, subjects
from beamline.backoff import backoff
from beamline.errors import ConfigError
from beamline.service import answer_health, crash_on_error
from beamline.settings import MeshSettings
from services.recorder import fastpath, otlp
from services.recorder.flusher import Flusher
from services.recorder.health import Health, first_line
from services.recorder.puller import Puller
from services.recorder.query import QueryEndpoint
from services.recorder.settings import RecorderSettings
from services.recorder.store import Store

SERVICE = "recorder"
CONSUMER_CHECK_S = 30.0  # how often the consumers are re-declared (idempotent)
STARTUP_STORAGE_WAIT_S = 10.0  # at start, wait this long for ClickHouse before going on
log = logging.getLogger("beamline.recorder")


class Recorder:
    def __init__(
        self,
        nc: NATS,
        cfg: RecorderSettings,
        mesh: MeshSettings,
        store: Store,
        streams_: Sequence[str] = subjects.RECORDED_STREAMS,
        export: otlp.OtlpExport | None = None,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.cfg = cfg
        self.mesh = mesh
        self.store = store
        self.streams = tuple(streams_)
        self.health = Health()
        self.export = export
        self.flusher = Flusher(
            nc,
            cfg,
            mesh.max_message_bytes,
            store,
            self.health,
            self._pump,
            on_spans=export.offer if export else None,
        )
        self.query = QueryEndpoint(nc, store, self.health)
        self.pullers = {
            s: Puller(nc, cfg, s, self.flusher.accept, self.flusher.paused, self._redeclare)
            for s in self.streams
        }
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subs: list[Subscription] = []
        self._flusher: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- JetStream layout --------------------------------------------------------------

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

    def _redeclare(self, stream: str) -> None:
        """The server says the consumer was deleted: declare it again."""
        self.spawn(self.ensure_consumer(stream))

    async def _ensure_layout(self) -> None:
        for stream in self.streams:
            await self.ensure_consumer(stream)

    async def _check_layout(self) -> None:
        """Recreate a consumer someone deleted; idempotent when all is well. A deleted stream
        is the init job's to declare again: the recorder's NATS user may not."""
        try:
            for stream in self.streams:
                try:
                    await self.ensure_consumer(stream)
                except NotFoundError:
                    log.warning(
                        "stream missing; run `beamline init` to declare it again",
                        extra={"stream": stream},
                    )
        except Exception as exc:  # NATS down: the next check tries again
            log.debug("consumer check failed", extra={"error": first_line(exc)})

    async def _await_layout(self, stop: asyncio.Event) -> bool:
        """Wait (bounded) for the streams, then declare the consumers, retrying while
        JetStream starts; False if `stop` came first. Raises ConfigError, naming them, when
        the streams do not appear within BEAMLINE_LAYOUT_WAIT_S."""
        uses = nats_auth.Uses(streams=self.streams)
        await streams.require_layout(self.js, uses, self.mesh.layout_wait_s)
        attempt = 0
        while True:  # JetStream may still be starting: retry instead of exiting
            try:
                await self._ensure_layout()
                return True
            except Exception as exc:
                attempt += 1
                delay = backoff(attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
                log.error(
                    f"cannot set up the recorder's JetStream consumers; retrying in "
                    f"{delay:.1f}s. Check that NATS at BEAMLINE_NATS_URL runs with JetStream",
                    extra={"error": first_line(exc), "attempt": attempt},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return False

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self, stop: asyncio.Event | None = None) -> bool:
        """Set up and start recording; False if `stop` was set before the setup succeeded."""
        if not await self._await_layout(stop or asyncio.Event()):
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
        if self.export:
            self.export.start()
        for puller in self.pullers.values():
            await puller.start()
        self._flusher = asyncio.create_task(self.flusher.run(), name="recorder-flush")
        self._ticker = asyncio.create_task(self._tick_loop(), name="recorder-tick")
        self._flusher.add_done_callback(crash_on_error)
        self._ticker.add_done_callback(crash_on_error)
        self.spawn(self.flusher.connect_storage())
        log.info(
            "recording",
            extra={
                "streams": list(self.streams),
                "storage": self.store.name,
                "batch_size": self.cfg.batch_size,
                "flush_interval_ms": self.cfg.flush_interval_ms,
            },
        )
        return True

    async def stop(self) -> None:
        """Stop pulling, store and ack what was received, then stop answering."""
        self.flusher.begin_stop()
        if self._ticker:
            self._ticker.cancel()
        for puller in self.pullers.values():
            await puller.drain()
        self.flusher.drained()
        if self._flusher:
            await self._flusher
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        if self.export:
            await asyncio.to_thread(self.export.close)
        await asyncio.to_thread(self.store.close)
        log.info(
            "recorder stopped",
            extra={"rows_recorded": self.health.rows_recorded, "batches": self.health.batches},
        )

    async def _pump(self) -> None:
        for puller in self.pullers.values():
            await puller.pump()

    async def _tick_loop(self) -> None:
        next_check = time.monotonic() + CONSUMER_CHECK_S
        while True:
            await self._pump()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CONSUMER_CHECK_S
                self.spawn(self._check_layout())
            await asyncio.sleep(0.05)

    async def _on_query(self, msg: Msg) -> None:
        if msg.reply:
            self.spawn(self.query.answer(msg))

    # --- health ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        health = self.health
        return {
            "ok": health.failures == 0,
            "storage": self.store.name,
            "storage_connected": self.store.connected,
            "streams": list(self.streams),
            "recorded_rows": health.rows_recorded,
            "recorded_spans": health.spans_recorded,
            "raw_rows": health.raw_rows,
            "poison_rows": health.poison_rows,
            "duplicates_skipped": health.duplicates_skipped,
            "batches": health.batches,
            "acked": health.acked,
            "ack_failures": health.ack_failures,
            "pending": self.flusher.pending,
            "consecutive_failures": health.failures,
            "last_insert_error": health.last_error,
            "last_insert_error_at": health.last_error_at,
            "queries": health.queries,
            "otlp": self.export.status() if self.export else None,
        }


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
    export = otlp.from_env(cfg)  # before connecting: a bad OTEL_* setting exits 2 at once
    # our error lines carry their cause; the OTLP exporter's own errors say why an export
    # failed, its warnings only that it retries
    for noisy in ("urllib3", "clickhouse_connect", "opentelemetry"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    nc = await bus.connect(mesh.nats_url, SERVICE)
    fastpath.install(nc)  # nats-py's header parser was the hot path's largest cost
    store = Store(mesh.resolved_clickhouse_url, cfg, mesh.max_message_bytes)
    recorder = Recorder(nc, cfg, mesh, store, export=export)
    try:
        if await recorder.start(stop):
            await stop.wait()
            await recorder.stop()
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
        with contextlib.suppress(Exception):
            await nc.close()
