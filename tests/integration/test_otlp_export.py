"""The recorder also sends the spans it stores to an OTLP/HTTP endpoint: a real receiver on
127.0.0.1 decodes the protobuf requests with opentelemetry-proto. An endpoint that is down
or hangs costs spans (counted), never a stored or acked message."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from beamline import bus, client, query, subjects
from beamline.testing import free_port, wait_for

from .conftest import MeshFactory, StartRecorder
from .test_otel_traces import assert_one_trace_with_parents, conversation

pytestmark = pytest.mark.timeout(120)

STORED_SQL = """
SELECT TraceId, SpanId, ParentSpanId, SpanName, SpanKind, ServiceName,
       toUnixTimestamp64Nano(Timestamp) AS start_ns, Duration, StatusCode, SpanAttributes
FROM otel_traces
WHERE SpanAttributes['gen_ai.conversation.id'] = {c:String}
"""
KINDS = {"Client": Span.SPAN_KIND_CLIENT, "Internal": Span.SPAN_KIND_INTERNAL}
STATUS = {"Unset": Status.STATUS_CODE_UNSET, "Error": Status.STATUS_CODE_ERROR}
TOKEN = "Bearer otlp-test-7c1e"


# --- a real OTLP/HTTP receiver ------------------------------------------------------------


@dataclass
class Received:
    span: Span
    service: str
    scope: str


@dataclass
class OtlpReceiver:
    """OTLP/HTTP traces on 127.0.0.1: decodes every request, or holds it until released."""

    hang: bool = False
    spans: list[Received] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    hanging: int = 0  # requests held open right now
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def serve(self) -> Iterator[str]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.hang:
                    with receiver.lock:
                        receiver.hanging += 1
                    receiver.release.wait(60)
                    with receiver.lock:
                        receiver.hanging -= 1
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.accept(ExportTraceServiceRequest.FromString(body), dict(self.headers))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            self.release.set()
            server.shutdown()
            server.server_close()

    def accept(self, request: ExportTraceServiceRequest, headers: dict[str, str]) -> None:
        with self.lock:
            self.headers.append({k.lower(): v for k, v in headers.items()})
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            Received(span, attrs.get("service.name", ""), scope_spans.scope.name)
                        )

    def of(self, conversation_id: str) -> list[Received]:
        with self.lock:
            return [
                r
                for r in self.spans
                if attribute(r.span, "gen_ai.conversation.id") == conversation_id
            ]


def attribute(span: Span, key: str) -> Any:
    for kv in span.attributes:
        if kv.key == key:
            return value(kv.value)
    return None


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(item) for item in v.array_value.values]
    return getattr(v, kind) if kind else None


StartReceiver = Callable[..., tuple[OtlpReceiver, str]]


@pytest.fixture
def otlp_receiver() -> Iterator[StartReceiver]:
    """Start receivers (`hang=True`: every request is held open); all stop at the end."""
    with ExitStack() as stack:

        def start(hang: bool = False) -> tuple[OtlpReceiver, str]:
            receiver = OtlpReceiver(hang=hang)
            return receiver, stack.enter_context(receiver.serve())

        yield start


async def otlp_status(nc: NATS) -> dict[str, Any]:
    answer = await nc.request(subjects.health("recorder"), b"", timeout=1)
    status = orjson.loads(answer.data)
    return {**status["otlp"], "acked": status["acked"]}


# --- the spans of a real task, as ClickHouse has them ------------------------------------


async def test_a_task_run_reaches_an_otlp_receiver_with_the_stored_ids_and_parents(
    start_mesh: MeshFactory, otlp_receiver: StartReceiver
) -> None:
    otlp, url = otlp_receiver()
    mesh = await start_mesh(
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": url,  # the exporter adds /v1/traces
            "OTEL_EXPORTER_OTLP_HEADERS": f"authorization={TOKEN}",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "BEAMLINE_RECORDER_OTLP_INTERVAL_MS": "100",
        }
    )
    await mesh.nc.publish(
        "bl.task.analysis",
        b'{"prompt": "What does 1000 in / 500 out cost?", "conversation_id": "otlp-1"}',
    )
    reply = await client.await_reply(mesh.nc, "otlp-1", timeout=30)
    assert reply.kind.value == "reply", reply

    async def stored() -> list[dict[str, Any]]:
        rows = (await query.query(mesh.nc, STORED_SQL, {"c": "otlp-1"})).dicts()
        return rows if len(rows) >= 4 else []

    rows = await wait_for(stored, timeout=20, what="spans in ClickHouse")
    assert_one_trace_with_parents(rows)
    await wait_for(lambda: len(otlp.of("otlp-1")) >= 4, timeout=20, what="OTLP spans")
    received = {r.span.span_id.hex(): r for r in otlp.of("otlp-1")}
    assert len(otlp.of("otlp-1")) == len(received) == 4  # each span sent once
    assert set(received) == {row["SpanId"] for row in rows}

    for row in rows:
        r = received[row["SpanId"]]
        span = r.span
        assert span.trace_id.hex() == row["TraceId"]
        assert span.parent_span_id.hex() == row["ParentSpanId"]
        assert span.start_time_unix_nano == int(row["start_ns"])
        assert span.end_time_unix_nano == int(row["start_ns"]) + int(row["Duration"])
        assert span.name == row["SpanName"]
        assert span.kind == KINDS[row["SpanKind"]]
        assert span.status.code == STATUS[row["StatusCode"]]
        assert r.service == row["ServiceName"] and r.scope == "beamline.recorder"
        for key, text in row["SpanAttributes"].items():
            got_value = attribute(span, key)
            assert str(got_value) == text or got_value == orjson.loads(text), (key, text)
    chats = [r.span for r in received.values() if r.span.name.startswith("chat ")]
    assert all(isinstance(attribute(c, "gen_ai.usage.output_tokens"), int) for c in chats)
    assert all(attribute(c, "gen_ai.response.finish_reasons") for c in chats)
    (agent,) = [r.span for r in received.values() if r.span.name.startswith("invoke_agent")]
    assert all(c.parent_span_id == agent.span_id for c in chats)  # one tree, as stored
    assert all(h.get("authorization") == TOKEN for h in otlp.headers)
    assert all(h.get("content-encoding") == "gzip" for h in otlp.headers)

    status = await otlp_status(mesh.nc)
    assert status["exported_spans"] >= 4 and status["dropped_spans"] == 0, status


# --- an endpoint that is down or hangs ---------------------------------------------------


async def publish(nc: NATS, conv: str) -> None:
    for subject, env in conversation(conv):  # 7 messages, 4 spans
        await bus.publish(nc.jetstream(), subject, env)


async def stored_spans(nc: NATS, conv: str) -> int:
    sql = (
        "SELECT uniqExact(SpanId) FROM otel_traces"
        " WHERE SpanAttributes['gen_ai.conversation.id'] = {c:String}"
    )
    return int((await query.query(nc, sql, {"c": conv})).rows[0][0])


async def test_an_otlp_endpoint_that_is_down_costs_counted_spans_not_records(
    nc: NATS, recorder: StartRecorder
) -> None:
    recorder(
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://127.0.0.1:{free_port()}/v1/traces",
        OTEL_EXPORTER_OTLP_TIMEOUT="1",
        BEAMLINE_RECORDER_OTLP_INTERVAL_MS="50",
        BEAMLINE_RECORDER_OTLP_MAX_ATTEMPTS="2",
    )
    await wait_for(lambda: otlp_status(nc), timeout=20, what="recorder health")
    await publish(nc, "otlp-down")

    async def settled() -> dict[str, Any] | None:
        status = await otlp_status(nc)
        return status if status["acked"] >= 7 and status["dropped_spans"] >= 4 else None

    status = await wait_for(settled, timeout=30, what="acks and dropped spans")
    assert status["exported_spans"] == 0 and status["failed_exports"] >= 2, status
    assert await wait_for(lambda: stored_spans(nc, "otlp-down"), timeout=10) == 4


async def test_a_hanging_otlp_endpoint_holds_back_no_ack_and_no_stop(
    nc: NATS, recorder: StartRecorder, otlp_receiver: StartReceiver
) -> None:
    otlp, url = otlp_receiver(hang=True)
    proc = recorder(
        OTEL_EXPORTER_OTLP_ENDPOINT=url,
        OTEL_EXPORTER_OTLP_TIMEOUT="60",  # longer than the test: the request stays open
        BEAMLINE_RECORDER_OTLP_INTERVAL_MS="50",
        BEAMLINE_RECORDER_OTLP_QUEUE_SIZE="4",  # one conversation's spans
        BEAMLINE_RECORDER_STOP_TIMEOUT_S="1",
    )
    await wait_for(lambda: otlp_status(nc), timeout=20, what="recorder health")
    await publish(nc, "otlp-hang-1")
    await wait_for(lambda: otlp.hanging, timeout=20, what="an export request held open")

    # the worker is stuck in that request: the next 4 spans fill the queue, the 4 after
    # them are dropped, and every message is still stored and acked meanwhile
    await publish(nc, "otlp-hang-2")
    await publish(nc, "otlp-hang-3")

    async def settled() -> dict[str, Any] | None:
        status = await otlp_status(nc)
        return status if status["acked"] >= 21 and status["dropped_spans"] >= 4 else None

    status = await wait_for(settled, timeout=30, what="acks while the endpoint hangs")
    assert otlp.hanging, "the export request is still open"
    assert status["exported_spans"] == 0 and status["queued"] == 4, status
    for conv in ("otlp-hang-1", "otlp-hang-2", "otlp-hang-3"):
        assert await wait_for(partial(stored_spans, nc, conv), timeout=10) == 4

    # SIGTERM while the request still hangs: the recorder gives the export its stop
    # timeout, then exits cleanly
    assert proc.stop(timeout=30) == 0, proc.logs()[-3000:]
    assert otlp.hanging
    assert "OTLP export stopped" in proc.logs()
