"""Recorded envelopes as OpenTelemetry spans: `bl_messages` rows in, `otel_traces` rows out.

Pure: no I/O. The recorder (services/recorder/store.py) plans the spans of a batch, looks
up what the plan says it lacks (the start of tasks recorded in earlier batches, span ids
already stored), and inserts the rows this module builds into `otel_traces`
(infra/clickhouse/002_otel_traces.sql, the OpenTelemetry Collector ClickHouse exporter's
schema), so the Grafana ClickHouse plugin's trace view and any OTel tool read them as is.

The span model is the one the agent already writes (nothing is added to the envelopes):

- `chat {model}`, one per `llm_response`. Its `span_id` is the LLM call's span and its
  parent the task's span; start = ts - latency_ms. SpanKind Client, service
  `beamline-gateway`, `gen_ai.*` attributes of the OpenTelemetry GenAI conventions.
- `chat {model}` too, one per `summary` written by an LLM call (context pressure: an agent
  summarising its older turns), with `beamline.context.*` attributes: the request
  estimates before and after, the window and threshold. A fresh window's seed (no LLM call)
  gives no span.
- `execute_tool {name}`, one per `tool_result`, a child of the `llm_response` that asked for
  it; start = ts - duration_ms. Status Error when `error_reason` is set. Service
  `beamline-agent`.
- `invoke_agent {agent}`, one per task, emitted when its `reply` or `error` is recorded. Its
  span is the task envelope's span (the outcome's `parent_span_id`), start = the task's ts
  (looked up by the outcome's `task_id`), end = the outcome's ts; status Error with the
  reason for an `error`. Its parent is the task's own parent (a caller's span), if any.
- `supervise {event}`, one per supervisor event (`bl.events.supervisor.<event>`: child
  started, exited, restarted, removed, stopped; gave up; escalated; host lost; agent
  re-homed; leader elected). A decision is an instant: start = end = ts. Its span and parent
  are the event envelope's. Service `beamline-supervisor`; every `data` field becomes a
  `beamline.<field>` attribute (`beamline.supervisor`, `beamline.child`, `beamline.exit`,
  `beamline.host`, ...; lists as JSON). Status Error where supervision itself failed (gave
  up, escalated, host lost), with `error.type` the event.

Span identity is deterministic: SpanId is the envelope's span (or the task's), and the
start and duration come from recorded values, so a message recorded twice gives the same
span row (the table is a ReplacingMergeTree over that identity).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import orjson

from beamline import rows, subjects

TRACES_TABLE: Final = "otel_traces"

# What the recorder writes, in order; Events.* and Links.* are left to their defaults (empty).
COLUMNS: Final = (
    "Timestamp",
    "TraceId",
    "SpanId",
    "ParentSpanId",
    "TraceState",
    "SpanName",
    "SpanKind",
    "ServiceName",
    "ResourceAttributes",
    "ScopeName",
    "ScopeVersion",
    "SpanAttributes",
    "Duration",
    "StatusCode",
    "StatusMessage",
)
_MAP: Final = "Map(LowCardinality(String), String)"
COLUMN_TYPES: Final = (
    "DateTime64(9)",
    "String",
    "String",
    "String",
    "String",
    "LowCardinality(String)",
    "LowCardinality(String)",
    "LowCardinality(String)",
    _MAP,
    "String",
    "String",
    _MAP,
    "UInt64",
    "LowCardinality(String)",
    "String",
)
_COL = {name: i for i, name in enumerate(COLUMNS)}
TRACE_ID, SPAN_ID, SPAN_NAME = _COL["TraceId"], _COL["SpanId"], _COL["SpanName"]

# The kinds that end in a span, and supervisor events (by subject); every other row costs a
# set lookup.
SOURCE_KINDS: Final = frozenset({"llm_response", "summary", "tool_result", "reply", "error"})
# subjects.event("supervisor", <event>): the supervisor's decisions
SUPERVISOR_EVENTS: Final = f"{subjects.PREFIX}.events.supervisor."
# Decisions that mean supervision failed at this supervisor; the others are its normal work.
FAILED_DECISIONS: Final = frozenset({"supervisor_gave_up", "escalated", "host_lost"})
OUTCOME_KINDS: Final = frozenset({"reply", "error"})
TASK_KINDS: Final = frozenset({"task", rows.KIND_RAW})  # a plain task is first recorded raw

SERVICE_GATEWAY: Final = "beamline-gateway"
SERVICE_AGENT: Final = "beamline-agent"
SERVICE_SUPERVISOR: Final = "beamline-supervisor"
SCOPE_NAME: Final = "beamline.recorder"
KIND_CLIENT: Final = "Client"  # the exporter's spelling (ptrace.SpanKind.String())
KIND_INTERNAL: Final = "Internal"
STATUS_UNSET: Final = "Unset"
STATUS_ERROR: Final = "Error"

_NS_PER_US: Final = 1000
_NS_PER_MS: Final = 1_000_000
_KIND = rows.KIND
_SUBJECT = rows.COLUMNS.index("subject")
_SENDER, _RECIPIENT = rows.COLUMNS.index("sender"), rows.COLUMNS.index("recipient")
_CONVERSATION = rows.COLUMNS.index("conversation_id")
_TRACE, _SPAN = rows.COLUMNS.index("trace_id"), rows.COLUMNS.index("span_id")
_PARENT = rows.COLUMNS.index("parent_span_id")
_IN_TOK, _OUT_TOK = rows.COLUMNS.index("input_tokens"), rows.COLUMNS.index("output_tokens")
_PAYLOAD = rows.COLUMNS.index("payload")


class TaskStart(NamedTuple):
    """What an invoke_agent span needs of its task: when it was recorded (µs) and its parent."""

    ts_us: int
    parent_span_id: str


@dataclass
class Plan:
    """The rows of a batch that give spans, and the start of every task in the batch."""

    sources: list[Sequence[Any]] = field(default_factory=list)
    tasks: dict[str, TaskStart] = field(default_factory=dict)  # task id -> its start

    def __bool__(self) -> bool:
        return bool(self.sources)

    def missing_tasks(self) -> list[str]:
        """The task ids of outcomes whose task is not in the batch: to look up."""
        missing: dict[str, None] = {}
        for row in self.sources:
            if row[_KIND] in OUTCOME_KINDS:
                task_id = _task_id(row)
                if task_id and task_id not in self.tasks:
                    missing[task_id] = None
        return list(missing)

    def may_be_stored(self, redelivered: Collection[str]) -> list[str]:
        """Span ids to look up before inserting: those of outcomes (an outcome is recorded
        twice, from the journal and from the replies stream, in any two batches) and those
        of rows delivered again (or of a batch whose insert may have landed)."""
        out: dict[str, None] = {}
        for row in self.sources:
            if row[_KIND] in OUTCOME_KINDS:
                if row[_PARENT]:
                    out[row[_PARENT]] = None
            elif row[rows.ID] in redelivered:
                out[row[_SPAN]] = None
        return list(out)

    def without(self, stored_span_ids: Collection[str]) -> None:
        """Forget the sources whose span is already stored."""
        if stored_span_ids:
            self.sources = [r for r in self.sources if _span_id(r) not in stored_span_ids]


def plan(message_rows: Iterable[Sequence[Any]]) -> Plan:
    """One pass over a batch's `bl_messages` rows (rows.COLUMNS order): the rows that give
    spans, and the start of every task in the batch. Other rows cost a set look-up."""
    out = Plan()
    sources = out.sources
    tasks = out.tasks
    for row in message_rows:
        kind = row[_KIND]
        if kind in SOURCE_KINDS or (kind == "event" and _is_decision(row)):
            sources.append(row)
        elif kind in TASK_KINDS and (kind == "task" or row[rows.ID] not in tasks):
            tasks[row[rows.ID]] = TaskStart(row[rows.TS], row[_PARENT])  # envelope over raw
    return out


def _is_decision(row: Sequence[Any]) -> bool:
    return row[_KIND] == "event" and str(row[_SUBJECT]).startswith(SUPERVISOR_EVENTS)


def _span_id(row: Sequence[Any]) -> str:
    """The span a source row gives: an outcome closes its task's span."""
    return str(row[_PARENT] if row[_KIND] in OUTCOME_KINDS else row[_SPAN])


def _task_id(row: Sequence[Any]) -> str:
    try:
        task_id = _payload(row).get("task_id")
    except (TypeError, ValueError):
        return ""
    return task_id if type(task_id) is str else ""


def build(p: Plan, looked_up: Mapping[str, TaskStart] | None = None) -> list[list[Any]]:
    """The `otel_traces` rows (COLUMNS order) of a plan, one per SpanId. `looked_up` gives
    the start of tasks recorded earlier; an outcome whose task is unknown still closes a
    span: it starts and ends at the outcome (Duration 0, `beamline.task.start_unknown`)."""
    tasks: Mapping[str, TaskStart] = {**looked_up, **p.tasks} if looked_up else p.tasks
    out: list[list[Any]] = []
    seen: set[str] = set()
    for row in p.sources:
        span = span_row(row, tasks)
        if span is not None and span[SPAN_ID] not in seen:
            seen.add(span[SPAN_ID])
            out.append(span)
    return out


def span_rows(
    message_rows: Iterable[Sequence[Any]], looked_up: Mapping[str, TaskStart] | None = None
) -> list[list[Any]]:
    """`plan` then `build`: the spans of these rows."""
    return build(plan(message_rows), looked_up)


def span_row(row: Sequence[Any], tasks: Mapping[str, TaskStart]) -> list[Any] | None:
    """The span of one `bl_messages` row, or None when it gives none."""
    kind = row[_KIND]
    if kind not in SOURCE_KINDS and not _is_decision(row):
        return None
    try:
        payload = _payload(row)
        if kind == "llm_response":
            return _chat(row, payload)
        if kind == "summary":
            return _summary_chat(row, payload)
        if kind == "tool_result":
            return _tool(row, payload)
        if kind == "event":
            return _decision(row, payload)
        return _invoke_agent(row, payload, tasks)
    except (TypeError, ValueError, OverflowError):
        return None  # a payload not of its kind's shape: the message row still records it


def dedup_token(span_rows_: Iterable[Sequence[Any]]) -> str:
    """The insert de-duplication token of a span insert: sha256 of its ordered span ids
    (in a namespace of its own, so it never equals the messages' token)."""
    h = hashlib.sha256(b"otel_traces\n")
    for r in span_rows_:
        h.update(r[SPAN_ID].encode())
        h.update(b"\n")
    return h.hexdigest()


# --- one span each ----------------------------------------------------------------------


def _payload(row: Sequence[Any]) -> dict[str, Any]:
    payload = orjson.loads(row[_PAYLOAD])
    if type(payload) is not dict:
        raise TypeError("payload")
    return payload


def _ms_to_ns(value: Any) -> int:
    if type(value) not in (int, float) or not value >= 0:  # NaN too
        return 0
    return round(float(value) * _NS_PER_MS)


def _text(value: Any) -> str:
    return value if type(value) is str else ""


def _span(
    row: Sequence[Any],
    *,
    start_ns: int,
    duration_ns: int,
    span_id: str,
    parent: str,
    name: str,
    kind: str,
    service: str,
    attributes: dict[str, str],
    status: str = STATUS_UNSET,
    message: str = "",
) -> list[Any]:
    return [
        max(0, start_ns),
        row[_TRACE],
        span_id,
        parent,
        "",
        name,
        kind,
        service,
        {"service.name": service},
        SCOPE_NAME,
        "",
        attributes,
        max(0, duration_ns),
        status,
        message,
    ]


def _chat(row: Sequence[Any], payload: dict[str, Any]) -> list[Any]:
    model = _text(payload.get("model"))
    duration = _ms_to_ns(payload.get("latency_ms"))
    end = row[rows.TS] * _NS_PER_US
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": _text(payload.get("provider")),
        "gen_ai.request.model": model,
        "gen_ai.response.model": model,
        "gen_ai.usage.input_tokens": str(row[_IN_TOK]),
        "gen_ai.usage.output_tokens": str(row[_OUT_TOK]),
        "gen_ai.conversation.id": row[_CONVERSATION],
        "beamline.agent": row[_RECIPIENT],
        "beamline.envelope_id": row[rows.ID],
    }
    finish = payload.get("finish_reason")
    if type(finish) is str and finish:
        attrs["gen_ai.response.finish_reasons"] = orjson.dumps([finish]).decode()
    attempts = payload.get("attempts")
    if type(attempts) is int:
        attrs["beamline.llm.attempts"] = str(attempts)
    return _span(
        row,
        start_ns=end - duration,
        duration_ns=duration,
        span_id=row[_SPAN],
        parent=row[_PARENT],
        name=f"chat {model}".rstrip(),
        kind=KIND_CLIENT,
        service=SERVICE_GATEWAY,
        attributes=attrs,
    )


def _summary_chat(row: Sequence[Any], payload: dict[str, Any]) -> list[Any] | None:
    """A summary's LLM call as a chat span like any other, saying what it shortened."""
    if not _text(payload.get("request_id")):
        return None  # a fresh window's seed: no LLM call was made
    span = _chat(row, payload)
    attrs = span[_COL["SpanAttributes"]]
    attrs["beamline.context.summary"] = "true"
    for key in ("tokens_before", "tokens_after", "window", "threshold"):
        attrs[f"beamline.context.{key}"] = _attribute(payload.get(key))
    return span


def _tool(row: Sequence[Any], payload: dict[str, Any]) -> list[Any]:
    name = _text(payload.get("name"))
    duration = _ms_to_ns(payload.get("duration_ms"))
    end = row[rows.TS] * _NS_PER_US
    attrs = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": name,
        "gen_ai.tool.call.id": _text(payload.get("call_id")),
        "gen_ai.conversation.id": row[_CONVERSATION],
        "beamline.agent": row[_RECIPIENT],
        "beamline.envelope_id": row[rows.ID],
    }
    error = _text(payload.get("error_reason"))
    if error:
        attrs["error.type"] = error
    return _span(
        row,
        start_ns=end - duration,
        duration_ns=duration,
        span_id=row[_SPAN],
        parent=row[_PARENT],
        name=f"execute_tool {name}".rstrip(),
        kind=KIND_INTERNAL,
        service=SERVICE_AGENT,
        attributes=attrs,
        status=STATUS_ERROR if error else STATUS_UNSET,
        message=_text(payload.get("result"))[:1024] if error else "",
    )


def _invoke_agent(
    row: Sequence[Any], payload: dict[str, Any], tasks: Mapping[str, TaskStart]
) -> list[Any] | None:
    task_id = payload.get("task_id")
    task_span = row[_PARENT]
    if type(task_id) is not str or not task_id or not task_span:
        return None  # not the outcome of a task (a gateway error, say)
    agent = row[_SENDER]
    end = row[rows.TS] * _NS_PER_US
    attrs = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": agent,
        "gen_ai.conversation.id": row[_CONVERSATION],
        "beamline.task_id": task_id,
        "beamline.envelope_id": row[rows.ID],
    }
    task = tasks.get(task_id)
    if task is None:
        start, parent = end, ""
        attrs["beamline.task.start_unknown"] = "true"
    else:
        start, parent = task.ts_us * _NS_PER_US, task.parent_span_id
    status, message = STATUS_UNSET, ""
    if row[_KIND] == "error":
        reason = _text(payload.get("reason"))
        status, message = STATUS_ERROR, f"{reason}: {_text(payload.get('message'))}"[:1024]
        attrs["error.type"] = reason
    return _span(
        row,
        start_ns=start,
        duration_ns=end - start,
        span_id=task_span,
        parent=parent,
        name=f"invoke_agent {agent}".rstrip(),
        kind=KIND_INTERNAL,
        service=SERVICE_AGENT,
        attributes=attrs,
        status=status,
        message=message,
    )


def _attribute(value: Any) -> str:
    """A span attribute value: text as it is, anything else as JSON (3, true, ["a"])."""
    return value if type(value) is str else orjson.dumps(value).decode()


def _decision(row: Sequence[Any], payload: dict[str, Any]) -> list[Any] | None:
    event = _text(payload.get("name"))
    data = payload.get("data")
    if not event or type(data) is not dict:
        return None
    attrs = {f"beamline.{key}": _attribute(value) for key, value in data.items()}
    attrs["beamline.event"] = event
    attrs["beamline.envelope_id"] = row[rows.ID]
    status, message = STATUS_UNSET, ""
    if event in FAILED_DECISIONS:
        attrs["error.type"] = event
        status, message = STATUS_ERROR, _text(data.get("exit"))[:1024]
    return _span(
        row,
        start_ns=row[rows.TS] * _NS_PER_US,
        duration_ns=0,
        span_id=row[_SPAN],
        parent=row[_PARENT],
        name=f"supervise {event}",
        kind=KIND_INTERNAL,
        service=SERVICE_SUPERVISOR,
        attributes=attrs,
        status=status,
        message=message,
    )
