"""services.recorder.otlp without a network: which endpoint the OTel variables name, rows
into the protobuf the official encoder sends (ids and ns times as stored), and the bounded
queue's accounting. The HTTP path is tested against a real receiver in
tests/integration/test_otlp_export.py."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from beamline import spans
from beamline.envelope import (
    ToolResultPayload,
)
from beamline.errors import ConfigError
from services.recorder import otlp
from services.recorder.settings import RecorderSettings
from tests.span_samples import col, conversation, row

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318/"}


def test_the_endpoint_follows_the_opentelemetry_variables() -> None:
    assert otlp.traces_endpoint({}) is None
    assert otlp.traces_endpoint(ENDPOINT) == "http://127.0.0.1:4318/v1/traces"
    traces = {**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:1/custom"}
    assert otlp.traces_endpoint(traces) == "http://h:1/custom"  # used as is
    assert otlp.traces_endpoint({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}) is None
    assert otlp.traces_endpoint({**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}) is None
    http = {**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    assert otlp.traces_endpoint(http) == "http://127.0.0.1:4318/v1/traces"


def test_a_protocol_other_than_http_protobuf_is_a_configuration_error() -> None:
    grpc = {**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL=grpc"):
        otlp.from_env(RecorderSettings(), grpc)
    # the traces-specific variable wins over the general one
    traces_http = {**grpc, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    assert otlp.traces_endpoint(traces_http) is not None


def test_rows_encode_with_the_stored_ids_times_and_typed_attributes() -> None:
    task, llm, tool, reply = conversation()
    failed = llm.child(
        ToolResultPayload(
            call_id="c2", name="calculator", result="boom", error_reason="tool_failed"
        ),
        sender="tool.calculator",
        recipient="analyst",
    )
    span_rows = spans.span_rows([row(e) for e in (task, llm, tool, failed, reply)])
    readable, invalid = otlp.readable_spans(span_rows)
    assert invalid == 0
    request = encode_spans(readable)
    encoded = {
        s.span_id.hex(): (s, rs.resource, ss.scope)
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    }
    assert len(encoded) == len(span_rows) == 4
    for stored in span_rows:
        span, resource, scope = encoded[col(stored, "SpanId")]
        assert span.trace_id.hex() == col(stored, "TraceId") == task.trace_id
        assert span.parent_span_id.hex() == col(stored, "ParentSpanId")
        assert span.start_time_unix_nano == col(stored, "Timestamp")
        assert span.end_time_unix_nano == col(stored, "Timestamp") + col(stored, "Duration")
        assert span.name == col(stored, "SpanName")
        assert [a.value.string_value for a in resource.attributes] == [col(stored, "ServiceName")]
        assert scope.name == spans.SCOPE_NAME
    chat = encoded[llm.span_id][0]
    assert chat.kind == Span.SPAN_KIND_CLIENT
    attrs = {a.key: a.value for a in chat.attributes}
    assert attrs["gen_ai.usage.input_tokens"].int_value == 120
    assert [v.string_value for v in attrs["gen_ai.response.finish_reasons"].array_value.values] == [
        "tool_calls"
    ]
    assert attrs["gen_ai.conversation.id"].string_value == "conv-1"
    error = encoded[failed.span_id][0]
    assert error.status.code == Status.STATUS_CODE_ERROR and error.status.message == "boom"
    assert encoded[tool.span_id][0].status.code == Status.STATUS_CODE_UNSET
    assert encoded[task.span_id][0].parent_span_id.hex() == "a" * 16  # the task's parent


def test_rows_whose_ids_otlp_cannot_carry_are_counted_not_sent() -> None:
    _, llm, _, _ = conversation()
    (good,) = spans.span_rows([row(llm)])
    bad = list(good)
    bad[spans.TRACE_ID] = "not-a-trace-id"
    readable, invalid = otlp.readable_spans([good, bad])
    assert len(readable) == 1 and invalid == 1


class Endpoint(SpanExporter):
    """An in-process SpanExporter: records batches, or fails while `down` is set."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.down = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.down.is_set():
            return SpanExportResult.FAILURE
        self.batches.append(len(spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def chat_rows(count: int) -> list[list[Any]]:
    _, llm, _, _ = conversation()
    (good,) = spans.span_rows([row(llm)])
    return [
        [*good[: spans.SPAN_ID], f"{i + 1:016x}", *good[spans.SPAN_ID + 1 :]] for i in range(count)
    ]


def settings(**kw: Any) -> RecorderSettings:
    base: dict[str, Any] = {
        "otlp_queue_size": 10,
        "otlp_batch_size": 4,
        "otlp_interval_ms": 10,
        "backoff_initial_s": 0.001,
        "backoff_max_s": 0.002,
        "stop_timeout_s": 5,
    }
    return RecorderSettings(**{**base, **kw})


def test_spans_beyond_the_queue_are_dropped_and_counted_and_the_rest_sent_in_batches() -> None:
    endpoint = Endpoint()
    export = otlp.OtlpExport("http://127.0.0.1:1/v1/traces", settings(), endpoint)
    export.offer(chat_rows(13))  # before the worker runs: 10 fit
    assert export.status()["queued"] == 10 and export.dropped == 3
    export.start()
    export.close()  # sends what is queued before it returns
    assert sum(endpoint.batches) == export.exported == 10
    assert max(endpoint.batches) <= 4
    assert export.dropped == 3


def test_a_batch_the_endpoint_keeps_refusing_is_dropped_after_the_attempts() -> None:
    endpoint = Endpoint()
    endpoint.down.set()
    export = otlp.OtlpExport("http://x/v1/traces", settings(otlp_max_attempts=3), endpoint)
    export.start()
    export.offer(chat_rows(4))
    export.close()
    assert export.exported == 0 and export.dropped == 4
    assert export.failed_exports == 3 and export.status()["last_failure_at"]
