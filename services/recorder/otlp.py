"""The recorded spans, also sent to an OTLP/HTTP endpoint (a Collector, Jaeger, Tempo,
Datadog...), best effort.

ClickHouse is the record; this is a copy, and it must never hold the record back. The
flusher offers the spans of a batch once the batch is stored and acked. They go into a
bounded queue that a worker thread drains in batches, so offering never waits on the
network: an endpoint that is down or hangs costs the recorder only the spans that do not
fit, which are dropped and counted (health `otlp.dropped_spans`). A batch the endpoint keeps
refusing is retried with capped, jittered backoff (`backoff`), then dropped and counted.
Delivery is at most once: spans queued by a recorder that dies are not exported by the next.

Turned on and configured by the standard variables, read as the OpenTelemetry exporter reads
them: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) or `OTEL_EXPORTER_OTLP_ENDPOINT`
(plus `/v1/traces`), `OTEL_EXPORTER_OTLP[_TRACES]_HEADERS`, `_TIMEOUT` (seconds, as the
Python exporter reads it), `_COMPRESSION`, `_CERTIFICATE`. `OTEL_SDK_DISABLED=true` or
`OTEL_TRACES_EXPORTER=none` turn it off. Only http/protobuf is spoken: another `_PROTOCOL`
is a configuration error rather than requests sent to a gRPC port.

Why the official exporter (opentelemetry-exporter-otlp-proto-http): it implements those
variables, the protobuf encoding and OTLP's retry rules (429/502/503/504, Retry-After,
connection errors) within its timeout. It takes SDK `ReadableSpan`s, so each otel_traces
row becomes one, with its ids and nanosecond times as stored. Why not the SDK's
BatchSpanProcessor in front of it: its queue drops spans without counting them, and it
gives up on a batch after one export call. The OpenTelemetry imports (~160 ms) happen only
when export is on.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import orjson

from beamline import spans, storage
from beamline.backoff import backoff
from beamline.errors import ConfigError
from services.recorder.settings import RecorderSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.util.types import AttributeValue

log = logging.getLogger("beamline.recorder")

HTTP_PROTOBUF: Final = "http/protobuf"
TRACES_PATH: Final = "v1/traces"
_COL: Final = {name: i for i, name in enumerate(spans.COLUMNS)}


def traces_endpoint(environ: Mapping[str, str]) -> str | None:
    """Where spans go, by the OpenTelemetry variables; None when export is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    traces = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not traces and not base:
        return None
    for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(var, "").strip()
        if protocol and protocol != HTTP_PROTOBUF:
            raise ConfigError(
                f"{var}={protocol}: the recorder exports spans over {HTTP_PROTOBUF} only "
                "(an OTLP/HTTP endpoint, usually port 4318); set it to http/protobuf or unset it"
            )
        if protocol:
            break  # the traces-specific variable wins over the general one
    return traces or f"{base.removesuffix('/')}/{TRACES_PATH}"


def from_env(cfg: RecorderSettings, environ: Mapping[str, str] = os.environ) -> OtlpExport | None:
    """The export the environment asks for, not started; None when it asks for none."""
    endpoint = traces_endpoint(environ)
    if endpoint is None:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    try:  # it reads the other OTEL_EXPORTER_OTLP_* variables (headers, timeout, TLS)
        exporter = OTLPSpanExporter(endpoint=endpoint)
    except Exception as exc:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_*: {exc}") from exc
    return OtlpExport(endpoint, cfg, exporter)


class OtlpExport:
    """A bounded queue of otel_traces rows and the thread that sends them in batches."""

    def __init__(self, endpoint: str, cfg: RecorderSettings, exporter: SpanExporter) -> None:
        self.endpoint = storage.redact_url(endpoint)
        self.cfg = cfg
        self._exporter = exporter
        self._queue: deque[Sequence[Any]] = deque()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._deadline = float("inf")  # set by close: when to stop trying
        self._thread = threading.Thread(target=self._run, name="recorder-otlp", daemon=True)
        self._troubled = False  # an outage was logged; log its end once, not every drop
        self.exported = 0
        self.dropped = 0
        self.failed_exports = 0
        self.last_failure_at: str | None = None

    def start(self) -> None:
        self._thread.start()
        log.info(
            "exporting spans over OTLP as well",
            extra={"endpoint": self.endpoint, "queue": self.cfg.otlp_queue_size},
        )

    def offer(self, span_rows: Sequence[Sequence[Any]]) -> None:
        """Queue spans for export. Never waits on the endpoint: what does not fit is dropped
        and counted (the lock is only ever held to move rows in or out of the queue)."""
        with self._cond:
            room = max(0, self.cfg.otlp_queue_size - len(self._queue))
            self._queue.extend(span_rows[:room])
            lost = len(span_rows) - min(room, len(span_rows))
            self.dropped += lost
            if len(self._queue) >= self.cfg.otlp_batch_size:
                self._cond.notify()
        if lost:
            self._trouble(f"the OTLP export queue is full ({self.cfg.otlp_queue_size} spans)")

    def close(self) -> None:
        """Send what is queued for at most `stop_timeout_s`, then stop. Blocks: call it from
        a worker thread."""
        self._deadline = time.monotonic() + self.cfg.stop_timeout_s
        self._stopping.set()
        with self._cond:
            self._cond.notify()
        self._thread.join(self.cfg.stop_timeout_s)
        self._exporter.shutdown()  # also cuts the exporter's own retry waits short
        with self._cond:
            unsent = len(self._queue)
            self.dropped += unsent
            self._queue.clear()
        log.info(
            "OTLP export stopped",
            extra={"exported_spans": self.exported, "dropped_spans": self.dropped},
        )

    def status(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "queued": len(self._queue),
            "exported_spans": self.exported,
            "dropped_spans": self.dropped,
            "failed_exports": self.failed_exports,
            "last_failure_at": self.last_failure_at,
        }

    # --- the worker thread ---------------------------------------------------------------

    def _run(self) -> None:
        while (rows := self._take()) is not None:
            if rows:
                self._send(rows)

    def _take(self) -> list[Sequence[Any]] | None:
        """The next batch: `otlp_batch_size` rows, or fewer once `otlp_interval_ms` has
        passed; None when stopping and nothing is left (or the stop deadline passed)."""
        size = self.cfg.otlp_batch_size
        with self._cond:
            if not self._stopping.is_set() and len(self._queue) < size:
                self._cond.wait(self.cfg.otlp_interval_ms / 1000)
            if self._stopping.is_set() and (not self._queue or time.monotonic() >= self._deadline):
                return None
            return [self._queue.popleft() for _ in range(min(size, len(self._queue)))]

    def _send(self, rows: list[Sequence[Any]]) -> None:
        """Export with backoff until the endpoint takes the batch, `otlp_max_attempts` are
        spent or the stop deadline comes; then count what was not sent as dropped."""
        batch, invalid = readable_spans(rows)
        if invalid:
            self._drop(invalid, "spans whose ids are not OTLP ids")
        attempt = 0
        while batch:
            if self._export(batch):
                self.exported += len(batch)
                if self._troubled:
                    self._troubled = False
                    log.info("OTLP export works again", extra={"endpoint": self.endpoint})
                return
            attempt += 1
            self.failed_exports += 1
            self.last_failure_at = datetime.now(UTC).isoformat()
            delay = backoff(attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
            if attempt >= self.cfg.otlp_max_attempts or time.monotonic() + delay > self._deadline:
                self._drop(len(batch), f"spans the endpoint did not take in {attempt} attempts")
                return
            self._trouble(f"an OTLP export failed; retrying in {delay:.1f}s")
            self._stopping.wait(delay)  # a stop cuts the wait short; the deadline still holds

    def _export(self, batch: Sequence[ReadableSpan]) -> bool:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            return self._exporter.export(batch) is SpanExportResult.SUCCESS
        except Exception:  # a bug here must cost spans, never the recorder
            log.exception("the OTLP exporter raised", extra={"endpoint": self.endpoint})
            return False

    def _drop(self, count: int, what: str) -> None:
        with self._cond:
            self.dropped += count
        log.error(
            f"dropped {count} {what}; they stay in ClickHouse (otel_traces)",
            extra={"endpoint": self.endpoint, "dropped_spans": self.dropped},
        )

    def _trouble(self, what: str) -> None:
        """Log the first sign of an outage; the counters in the health answer carry the rest."""
        if not self._troubled:
            self._troubled = True
            log.error(
                f"{what}. Spans still go to ClickHouse; those that cannot be exported are "
                "dropped and counted (health: otlp.dropped_spans). Check that the endpoint "
                "runs and speaks OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT)",
                extra={"endpoint": self.endpoint, "dropped_spans": self.dropped},
            )


# --- otel_traces rows as SDK spans ---------------------------------------------------------

# otel_traces keeps every attribute value as text, as the ClickHouse exporter does; OTLP
# carries types, and the GenAI conventions give these their own
_INT_ATTRIBUTES: Final = frozenset(
    {"gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "beamline.llm.attempts"}
)
_JSON_ARRAY_ATTRIBUTES: Final = frozenset({"gen_ai.response.finish_reasons"})


def readable_spans(rows: Sequence[Sequence[Any]]) -> tuple[list[ReadableSpan], int]:
    """otel_traces rows (spans.COLUMNS order) as SDK spans with the same trace, span and
    parent ids and nanosecond times; and how many rows had ids OTLP cannot carry."""
    out: list[ReadableSpan] = []
    for row in rows:
        span = readable_span(row)
        if span is not None:
            out.append(span)
    return out, len(rows) - len(out)


def readable_span(row: Sequence[Any]) -> ReadableSpan | None:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode

    trace_id = _hex_id(row[_COL["TraceId"]], 32)
    span_id = _hex_id(row[_COL["SpanId"]], 16)
    parent_id = _hex_id(row[_COL["ParentSpanId"]], 16)
    if not trace_id or not span_id:
        return None
    code = getattr(StatusCode, str(row[_COL["StatusCode"]]).upper(), StatusCode.UNSET)
    start = int(row[_COL["Timestamp"]])
    return ReadableSpan(
        name=row[_COL["SpanName"]],
        context=SpanContext(trace_id, span_id, is_remote=False),
        parent=SpanContext(trace_id, parent_id, is_remote=False) if parent_id else None,
        resource=_resource(tuple(sorted(row[_COL["ResourceAttributes"]].items()))),
        attributes={k: _attribute(k, v) for k, v in row[_COL["SpanAttributes"]].items()},
        kind=getattr(SpanKind, str(row[_COL["SpanKind"]]).upper(), SpanKind.INTERNAL),
        status=Status(code, row[_COL["StatusMessage"]] if code is StatusCode.ERROR else None),
        start_time=start,
        end_time=start + int(row[_COL["Duration"]]),
        instrumentation_scope=InstrumentationScope(
            row[_COL["ScopeName"]], row[_COL["ScopeVersion"]] or None
        ),
    )


def _hex_id(value: Any, digits: int) -> int:
    """A W3C id as an int; 0 (OTLP's "none") for anything else."""
    if type(value) is not str or len(value) != digits:
        return 0
    try:
        return int(value, 16)
    except ValueError:
        return 0


def _attribute(key: str, value: str) -> AttributeValue:
    try:
        if key in _INT_ATTRIBUTES:
            return int(value)
        if key in _JSON_ARRAY_ATTRIBUTES:
            items = orjson.loads(value)
            if type(items) is list and all(type(i) is str for i in items):
                return items
    except ValueError:
        pass
    return value


@functools.lru_cache(maxsize=256)
def _resource(attributes: tuple[tuple[str, str], ...]) -> Resource:
    """One Resource per service: the encoder groups spans by resource, hashing it per span."""
    from opentelemetry.sdk.resources import Resource

    return Resource(dict(attributes))
