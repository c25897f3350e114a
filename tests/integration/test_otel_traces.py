"""Recorded envelopes become otel_traces spans: one task, one trace, with the right parents,
and no duplicate spans when the recorder is killed between insert and ack."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS

from beamline import bus, client, query, subjects
from beamline.envelope import (
    ChatMessage,
    Envelope,
    Kind,
    LLMResponsePayload,
    ReplyPayload,
    TaskPayload,
    ToolResultPayload,
    Usage,
)
from beamline.testing import wait_for

from .conftest import ROOT, MeshFactory, StartRecorder

pytestmark = pytest.mark.timeout(90)

SPANS_SQL = """
SELECT TraceId, SpanId, ParentSpanId, SpanName, Duration, StatusCode, SpanAttributes
FROM otel_traces
WHERE SpanAttributes['gen_ai.conversation.id'] = {c:String}
ORDER BY Timestamp
"""
COUNT_SQL = """
SELECT count(), uniqExact(SpanId) FROM otel_traces
WHERE SpanAttributes['gen_ai.conversation.id'] = {c:String}
"""


async def spans_of(nc: NATS, conversation: str, want: int) -> list[dict[str, Any]]:
    found = (await query.query(nc, SPANS_SQL, {"c": conversation})).dicts()
    return found if len(found) >= want else []


def assert_one_trace_with_parents(found: list[dict[str, Any]]) -> None:
    names = sorted(s["SpanName"] for s in found)
    assert len(names) == 4 and names[0].startswith("chat ") and names[1].startswith("chat ")
    assert names[2:] == ["execute_tool calculator", "invoke_agent analyst"], names
    assert len({s["TraceId"] for s in found}) == 1, found
    (agent,) = [s for s in found if s["SpanName"] == "invoke_agent analyst"]
    chats = [s for s in found if s["SpanName"].startswith("chat ")]
    (tool,) = [s for s in found if s["SpanName"] == "execute_tool calculator"]
    assert all(c["ParentSpanId"] == agent["SpanId"] for c in chats)
    assert tool["ParentSpanId"] in {c["SpanId"] for c in chats}
    assert all(int(s["Duration"]) > 0 for s in found), found
    assert all(s["StatusCode"] == "Unset" for s in found)
    assert all(c["SpanAttributes"]["gen_ai.operation.name"] == "chat" for c in chats)
    assert all(int(c["SpanAttributes"]["gen_ai.usage.output_tokens"]) > 0 for c in chats)
    assert tool["SpanAttributes"]["gen_ai.tool.call.id"]


async def test_a_task_with_a_tool_call_is_one_trace_of_otel_spans(
    start_mesh: MeshFactory,
) -> None:
    mesh = await start_mesh()
    await mesh.nc.publish(
        "bl.task.analysis",
        b'{"prompt": "What does 1000 in / 500 out cost?", "conversation_id": "otel-1"}',
    )
    reply = await client.await_reply(mesh.nc, "otel-1", timeout=30)
    assert reply.kind.value == "reply", reply

    found = await wait_for(lambda: spans_of(mesh.nc, "otel-1", 4), timeout=20, what="spans")
    assert_one_trace_with_parents(found)
    (agent,) = [s for s in found if s["SpanName"] == "invoke_agent analyst"]
    # the reply was recorded from the journal and the replies stream: still one span
    counts = (await query.query(mesh.nc, COUNT_SQL, {"c": "otel-1"})).rows[0]
    assert counts[0] == counts[1] == 4
    # the trace-id lookup table the plugin reads covers the trace
    lookup = await query.query(
        mesh.nc,
        "SELECT count() FROM otel_traces_trace_id_ts WHERE TraceId = {t:String}",
        {"t": agent["TraceId"]},
    )
    assert lookup.rows[0][0] >= 1


# --- a redelivery adds no spans: the recorder killed between insert and ack -------------


def conversation(conv: str) -> list[tuple[str, Envelope]]:
    """(subject, envelope) as an agent would record a task with one tool call."""
    t0 = datetime.now(UTC) - timedelta(seconds=5)
    task = Envelope(
        kind=Kind.TASK,
        sender="user",
        recipient="role:analysis",
        conversation_id=conv,
        payload=TaskPayload(prompt="cost?"),
        ts=t0,
    )

    def llm(step: int, finish: str, at: float) -> Envelope:
        return task.child(
            LLMResponsePayload(
                request_id=f"r{step}",
                provider="fakellm",
                model="m1",
                message=ChatMessage(role="assistant", content="x"),
                finish_reason=finish,
                latency_ms=40.0,
            ),
            sender="gateway.fakellm",
            recipient="analyst",
            usage=Usage(input_tokens=50, output_tokens=5),
            ts=t0 + timedelta(seconds=at),
        )

    first = llm(1, "tool_calls", 1)
    tool = first.child(
        ToolResultPayload(call_id="c1", name="calculator", result="0.5", duration_ms=0.5),
        sender="tool.calculator",
        recipient="analyst",
        ts=t0 + timedelta(seconds=1.1),
    )
    second = llm(2, "stop", 2)
    reply = task.child(
        ReplyPayload(task_id=task.id, text="0.5"),
        sender="analyst",
        recipient="user",
        ts=t0 + timedelta(seconds=3),
    )
    journal = subjects.journal("analyst", conv)
    return [
        (subjects.task("analysis"), task),
        (journal, task),
        (journal, first),
        (journal, tool),
        (journal, second),
        (journal, reply),
        (subjects.reply(conv), reply),
    ]


async def test_a_redelivered_batch_adds_no_duplicate_spans(
    nc: NATS, recorder: StartRecorder
) -> None:
    js = nc.jetstream()
    crashing = recorder(BEAMLINE_RECORDER_CRASH_AFTER_INSERT="1")
    await wait_for(lambda: nc.request(subjects.health("recorder"), b"", timeout=1), timeout=20)
    for subject, env in conversation("otel-redelivery"):  # one batch: 50 ms flush interval
        await bus.publish(js, subject, env)
    await wait_for(lambda: not crashing.alive(), timeout=20, what="the fault-injected exit")
    assert crashing.popen.returncode == 137

    # a second conversation joins the redelivered batch: a different span set, so a new
    # insert token, and only the recorder's look-up of stored span ids keeps the first out
    for subject, env in conversation("otel-redelivery-2"):
        await bus.publish(js, subject, env)
    recorder()  # the same data dir, without the fault: everything is delivered again

    async def settled() -> bool:
        answer = await nc.request(subjects.health("recorder"), b"", timeout=1)
        return bool(orjson.loads(answer.data)["acked"] >= 14)

    await wait_for(settled, timeout=30, what="redelivered messages acked")
    status = orjson.loads((await nc.request(subjects.health("recorder"), b"", timeout=1)).data)
    assert status["duplicates_skipped"] > 0  # the stored messages were delivered again
    found = await wait_for(lambda: spans_of(nc, "otel-redelivery", 4), timeout=20, what="spans")
    for conv in ("otel-redelivery", "otel-redelivery-2"):
        found = await wait_for(partial(spans_of, nc, conv, 4), timeout=20, what="spans")
        counts = (await query.query(nc, COUNT_SQL, {"c": conv})).rows[0]
        assert counts[0] == counts[1] == 4, found
        assert_one_trace_with_parents(found)


# --- the Store against its own chDB (a subprocess: one chDB engine path per process) -----

STORE_SCRIPT = """
import sys
from beamline import bus, rows
from services.recorder.batch import Batch
from services.recorder.settings import RecorderSettings
from services.recorder.store import Store

from tests.integration.test_otel_traces import conversation

made = {}
def recorded(conv):
    if conv not in made:
        made[conv] = conversation(conv)
    return made[conv]

store = Store("chdb://" + sys.argv[1], RecorderSettings(), 10**6)

def batch(convs, redelivered):
    b = Batch(10_000, 1.0)
    seq = 0
    for conv in convs:
        for subject, env in recorded(conv):
            seq += 1
            row = rows.envelope_row(bus.encode(env), subject=subject, stream="BL_JOURNAL",
                                    stream_seq=seq, max_message_bytes=10**6, stream_ts_ns=0)
            b.add(row, seq, 0.0, redelivered=redelivered)
    return b

def counts(conv):
    return store.writer().query(
        "SELECT count(), uniqExact(SpanId) FROM otel_traces"
        " WHERE SpanAttributes['gen_ai.conversation.id'] = {c:String}", parameters={"c": conv}
    ).result_rows[0]

first = store.write(batch(["a"], False))
assert first.spans == 4, first
again = store.write(batch(["a"], True))
assert again.inserted == 0 and again.spans == 0, again
mixed = store.write(batch(["a", "b"], True))  # another span set: another insert token
assert mixed.spans == 4, mixed
assert counts("a") == (4, 4) and counts("b") == (4, 4), (counts("a"), counts("b"))

# the messages stored, the spans not (a failure in between): the retry completes the spans
real = store._write_spans
def fail(*args, **kwargs):
    raise ConnectionError("spans refused")
store._write_spans = fail
try:
    store.write(batch(["c"], False))
except ConnectionError:
    pass
else:
    raise AssertionError("the span insert failure must reach the flusher")
store._write_spans = real
b = batch(["c"], False)
b.mark_uncertain()  # what the flusher does after a failed attempt
retry = store.write(b)
assert retry.inserted == 0 and retry.spans == 4, retry
assert counts("c") == (4, 4), counts("c")
print("ok")
"""


def test_the_store_writes_spans_once_across_redeliveries_and_retries(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", STORE_SCRIPT, str(tmp_path / "chdb")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'shared'}"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-4000:]
