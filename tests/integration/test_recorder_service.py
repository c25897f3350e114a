"""The recorder as a real process against a real nats-server and a real (embedded) chDB.

The test process never opens the recorder's chDB path: it reads through `bl.query.sql`,
as every other process must. Each recorder is killed in the fixture's finalizer.
"""

from __future__ import annotations

import asyncio
import json
from functools import partial
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerInfo

from beamline import bus, ids, subjects
from beamline.envelope import (
    DeadLetterPayload,
    Envelope,
    EventPayload,
    Kind,
    ReplyPayload,
    TaskPayload,
    Usage,
)
from beamline.testing import NatsServer, free_port, wait_for

from .conftest import StartRecorder

pytestmark = pytest.mark.timeout(60)


async def health(nc: NATS) -> dict[str, Any]:
    msg = await nc.request(subjects.health("recorder"), b"", timeout=1)
    answer: dict[str, Any] = json.loads(msg.data)
    return answer


async def ready(nc: NATS) -> dict[str, Any]:
    status: dict[str, Any] = await wait_for(lambda: health(nc), timeout=20, what="health")
    return status


async def sql(nc: NATS, statement: str, **parameters: Any) -> dict[str, Any]:
    body = orjson.dumps({"sql": statement, "parameters": parameters})
    msg = await nc.request(subjects.QUERY, body, timeout=10)
    answer: dict[str, Any] = orjson.loads(msg.data)
    return answer


async def scalar(nc: NATS, statement: str, **parameters: Any) -> Any:
    answer = await sql(nc, statement, **parameters)
    assert "error" not in answer, answer
    return answer["rows"][0][0]


async def until_scalar(
    nc: NATS, statement: str, expected: Any, timeout: float = 15, **parameters: Any
) -> None:

    async def check() -> bool:
        return bool(await scalar(nc, statement, **parameters) == expected)

    await wait_for(check, timeout=timeout, interval=0.05, what=f"{statement} == {expected}")


async def consumer(nc: NATS, stream: str) -> ConsumerInfo:
    info: ConsumerInfo = await nc.jetstream().consumer_info(stream, subjects.CONSUMER_RECORDER)
    return info


def acked(info: ConsumerInfo) -> int:
    """The stream sequence up to which everything is acked."""
    return (info.ack_floor.stream_seq or 0) if info.ack_floor else 0


async def all_acked(nc: NATS, stream: str, last_seq: int, timeout: float = 15) -> None:
    async def check() -> bool:
        info = await consumer(nc, stream)
        return acked(info) == last_seq and info.num_ack_pending == 0 and info.num_pending == 0

    await wait_for(check, timeout=timeout, what=f"{stream} acked up to {last_seq}")


def task(conversation: str, prompt: str = "find papers") -> Envelope:
    return Envelope(
        kind=Kind.TASK,
        sender="user",
        recipient="role:researcher",
        conversation_id=conversation,
        payload=TaskPayload(prompt=prompt),
    )


async def test_every_recorded_stream_becomes_rows_and_queries_are_read_only(
    nc: NATS, recorder: StartRecorder
) -> None:
    recorder()
    await ready(nc)
    js = nc.jetstream()
    conv = "conv-all"
    first = task(conv)

    def child(payload: Any, sender: str, recipient: str, **kw: Any) -> Envelope:
        return first.child(payload, sender=sender, recipient=recipient, **kw)

    dead = DeadLetterPayload(
        reason="unknown_role",
        detail="no role",
        subject="bl.task.x",
        original="{}",
        original_bytes=2,
    )
    published = [
        (subjects.task("researcher"), first),
        (subjects.inbox("agent-7"), child(TaskPayload(prompt="go"), "d", "agent-7")),
        (subjects.journal("agent-7", conv), child(EventPayload(name="step"), "agent-7", "agent-7")),
        (
            subjects.reply(conv),
            child(
                ReplyPayload(task_id=first.id, text="done"),
                "agent-7",
                "user",
                usage=Usage(input_tokens=10, output_tokens=5),
            ),
        ),
        (
            subjects.event("gateway", "breaker_opened"),
            child(EventPayload(name="breaker_opened", data={"p": "x"}), "gateway", "*"),
        ),
        (subjects.dlq("dispatch"), child(dead, "dispatch", "dlq")),
        (
            subjects.escalation("agent-7"),
            child(EventPayload(name="escalation_opened"), "loopguard", "agent-7"),
        ),
    ]
    for subject, env in published:
        await bus.publish(js, subject, env)

    count = "SELECT count() FROM bl_messages FINAL WHERE conversation_id = {c:String}"
    await until_scalar(nc, count, 7, c=conv)
    answer = await sql(
        nc,
        "SELECT id, kind, stream, subject, reason, input_tokens, output_tokens, trace_id"
        " FROM bl_messages FINAL WHERE conversation_id = {c:String} ORDER BY ts",
        c=conv,
    )
    assert answer["columns"][:3] == ["id", "kind", "stream"]
    assert answer["types"][5] == "UInt32"
    rows = {r[0]: r for r in answer["rows"]}
    assert set(rows) == {env.id for _, env in published}
    assert {r[2] for r in rows.values()} == set(subjects.RECORDED_STREAMS)
    assert {r[7] for r in rows.values()} == {first.trace_id}
    by_kind = {r[1]: r for r in rows.values()}
    assert by_kind["reply"][5:7] == [10, 5]
    assert by_kind["dead_letter"][4] == "unknown_role"
    assert rows[published[1][1].id][3].startswith("bl.mbox.")  # stored subject after transform
    for stream in subjects.RECORDED_STREAMS:
        await all_acked(nc, stream, 1)

    # the same envelope again, past JetStream's de-duplication (a new stream message)
    again = published[0][1]
    ack = await bus.publish(js, subjects.task("researcher"), again, {subjects.H_MSG_ID: "other"})
    await all_acked(nc, subjects.STREAM_TASKS, ack.seq)
    await until_scalar(nc, count, 7, c=conv)
    assert await scalar(nc, "SELECT uniqExact(id) FROM bl_messages") == 7
    assert await scalar(nc, "SELECT count() FROM bl_messages FINAL") == 7

    # hostile values stay values
    by_conv = "SELECT count() FROM bl_messages WHERE conversation_id = {c:String}"
    for hostile in ("' OR 1=1 --", "'); DROP TABLE bl_messages; --"):
        assert await scalar(nc, by_conv, c=hostile) == 0
    # statements that are not a single read are refused, by the check or by readonly=1
    for statement in (
        "INSERT INTO bl_messages (id) VALUES ('x')",
        "DROP TABLE bl_messages",
        "SELECT 1; DROP TABLE bl_messages",
        "SELECT 1 SETTINGS readonly = 0",
        "SELECT * FROM file('/etc/hostname', 'LineAsString')",
        "SELECT number FROM numbers(100000)",  # over query_max_rows
        "SELECT no_such_column FROM bl_messages",
    ):
        answer = await sql(nc, statement)
        assert answer["error"]["reason"] == "query_rejected", (statement, answer)
    answer = await sql(nc, "SELECT {x:String}")
    assert "without a value" in answer["error"]["message"]
    bad = await nc.request(subjects.QUERY, b"not json", timeout=5)
    assert orjson.loads(bad.data)["error"]["reason"] == "query_rejected"
    assert await scalar(nc, "SELECT count() FROM bl_messages FINAL") == 7  # nothing dropped
    empty = await sql(nc, "SELECT id, ts FROM bl_messages WHERE id = {i:String}", i="none")
    assert empty == {
        "columns": ["id", "ts"],
        "types": ["String", "DateTime64(6, 'UTC')"],
        "rows": [],
    }

    status = await health(nc)
    assert status["ok"] and status["recorded_rows"] >= 7 and status["last_insert_error"] is None


async def test_bad_input_is_recorded_as_raw_rows(nc: NATS, recorder: StartRecorder) -> None:
    proc = recorder(BEAMLINE_MAX_MESSAGE_BYTES="2048")
    await ready(nc)
    js = nc.jetstream()
    subject = subjects.event("fuzz", "junk")
    wrong_kind = orjson.loads(bus.encode(task("conv-raw")))
    wrong_kind["kind"] = "reply"
    traceparent = {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}
    junk = [
        (b"not json {", "not_json", None),
        (b"\xff\xfe\x00 binary", "not_json", None),
        (b'{"hello": "world"}', "invalid_schema", traceparent),
        (orjson.dumps(wrong_kind), "invalid_schema", None),
        (b"x" * 5000, "oversized", None),
    ]
    expected = {}
    for data, reason, headers in junk:
        ack = await js.publish(subject, data, headers=headers)
        expected[ids.derived_id(subjects.STREAM_EVENTS, str(ack.seq))] = (reason, data)
    fine = task("conv-raw-after")
    await bus.publish(js, subject, fine)

    await until_scalar(nc, "SELECT count() FROM bl_messages FINAL", 6)
    answer = await sql(
        nc,
        "SELECT id, reason, payload, trace_id, kind FROM bl_messages FINAL"
        " WHERE kind = {k:String} ORDER BY stream_seq",
        k="raw",
    )
    got = {r[0]: r for r in answer["rows"]}
    assert set(got) == set(expected)
    for row_id, (reason, data) in expected.items():
        assert got[row_id][1] == reason
        assert got[row_id][2] == data[:2048].decode("utf-8", "replace")
    assert [r[3] for r in got.values() if r[1] == "invalid_schema"].count("ab" * 16) == 1
    assert (
        await scalar(nc, "SELECT kind FROM bl_messages WHERE id = {i:String}", i=fine.id) == "task"
    )
    assert proc.alive()
    assert (await health(nc))["raw_rows"] == 5


async def test_killed_between_insert_and_ack_leaves_no_duplicates(
    nc: NATS, recorder: StartRecorder
) -> None:
    js = nc.jetstream()
    envs = [task("conv-crash", f"p{i}") for i in range(30)]
    for env in envs:
        await bus.publish(js, subjects.task("researcher"), env)

    crashing = recorder(BEAMLINE_RECORDER_CRASH_AFTER_INSERT="1")
    await wait_for(lambda: not crashing.alive(), timeout=20, what="the fault-injected exit")
    assert crashing.popen.returncode == 137
    assert "fault injection" in crashing.logs()
    info = await consumer(nc, subjects.STREAM_TASKS)
    assert acked(info) == 0 and (info.num_ack_pending or 0) > 0  # stored, not acked

    recorder()  # the same data dir, without the fault
    await all_acked(nc, subjects.STREAM_TASKS, len(envs), timeout=20)  # after ack_wait (2 s)
    raw = await scalar(nc, "SELECT count() FROM bl_messages")
    distinct = await scalar(nc, "SELECT uniqExact(id) FROM bl_messages")
    assert raw == distinct == len(envs)
    status = await health(nc)
    assert status["duplicates_skipped"] > 0  # redelivered rows found already stored


async def test_clickhouse_down_keeps_running_and_acks_nothing(
    nc: NATS, recorder: StartRecorder
) -> None:
    url = f"http://default:s3cret-pw@127.0.0.1:{free_port()}/default"  # nothing listens
    proc = recorder(BEAMLINE_CLICKHOUSE_URL=url)
    await ready(nc)
    js = nc.jetstream()
    for i in range(5):
        await bus.publish(js, subjects.task("researcher"), task("conv-down", f"p{i}"))

    async def failing() -> dict[str, Any] | None:
        status = await health(nc)
        ok = status["pending"] == 5 and status["consecutive_failures"] >= 2
        return status if ok else None

    status = await wait_for(failing, timeout=15, what="failed inserts in health")
    assert status["ok"] is False and status["recorded_rows"] == 0
    assert "unavailable" in status["last_insert_error"]
    info = await consumer(nc, subjects.STREAM_TASKS)
    assert acked(info) == 0 and info.num_ack_pending == 5
    assert proc.alive()
    await wait_for(lambda: "stay unacked in JetStream" in proc.logs(), what="the error log")
    logs = proc.logs()
    assert "into ClickHouse failed" in logs and "BEAMLINE_CLICKHOUSE_URL" in logs
    assert "s3cret-pw" not in logs and "s3cret-pw" not in json.dumps(status)
    answer = await sql(nc, "SELECT 1")
    assert answer["error"]["reason"] == "storage_unavailable"


async def test_recording_continues_after_nats_restarts(
    nc: NATS, nats_server: NatsServer, recorder: StartRecorder
) -> None:
    proc = recorder()
    await ready(nc)
    js = nc.jetstream()
    for i in range(3):
        await bus.publish(js, subjects.task("researcher"), task("conv-restart", f"before{i}"))
    await until_scalar(nc, "SELECT count() FROM bl_messages FINAL", 3)

    nats_server.kill()
    await asyncio.to_thread(nats_server.start)  # same port, same store

    async def publish(env: Envelope) -> bool:
        try:
            await bus.publish(js, subjects.task("researcher"), env, timeout=1)
            return True
        except Exception:
            return False

    for i in range(3):
        env = task("conv-restart", f"after{i}")
        await wait_for(partial(publish, env), timeout=20, what="publish after restart")
    await until_scalar(nc, "SELECT count() FROM bl_messages FINAL", 6, timeout=20)
    await all_acked(nc, subjects.STREAM_TASKS, 6)
    assert proc.alive()


async def test_sigterm_flushes_the_open_batch(nc: NATS, recorder: StartRecorder) -> None:
    proc = recorder(
        BEAMLINE_RECORDER_FLUSH_INTERVAL_MS="600000", BEAMLINE_RECORDER_BATCH_SIZE="100000"
    )
    await ready(nc)
    js = nc.jetstream()
    for i in range(25):
        await bus.publish(js, subjects.reply("conv-term"), task("conv-term", f"p{i}"))

    async def holding() -> bool:
        return bool((await health(nc))["pending"] == 25)

    await wait_for(holding, timeout=15, what="25 messages in the open batch")
    assert acked(await consumer(nc, subjects.STREAM_REPLIES)) == 0
    assert await asyncio.to_thread(proc.stop, 15) == 0
    await all_acked(nc, subjects.STREAM_REPLIES, 25, timeout=5)  # stored, then acked, then exit
    assert "recorder stopped" in proc.logs()

    recorder()
    await ready(nc)
    assert await scalar(nc, "SELECT count() FROM bl_messages") == 25
