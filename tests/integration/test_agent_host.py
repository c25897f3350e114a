"""The spine end to end: tasks over plain NATS through durable agents, the gateway and
fakellm (real HTTP), replies on their subject, every message recorded in ClickHouse."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from nats.js.api import ConsumerConfig, DeliverPolicy

from beamline import bus, client, query, reads, subjects
from beamline.envelope import Envelope
from beamline.testing import free_port, wait_for

from .conftest import API_KEY, ROOT, MeshFactory, MeshHandle, needs_local_nats

PROBE_TOOLS = '''
import os
from beamline import tool

@tool
def remember(note: str) -> str:
    """Write a note down (the test counts how often this really ran)."""
    with open(os.environ["PROBE_FILE"], "a") as f:
        f.write(note + "\\n")
    return "noted: " + note
'''

PROBE_CONFIG = """
version: 1
tools_modules: [probe_tools]
providers:
  fakellm: {kind: openai, base_url: "${BEAMLINE_FAKELLM_URL}/v1", api_key_env: FAKELLM_API_KEY,
            timeout_s: 10, max_attempts: 2, context_window: 128000}
agents:
  - {name: prober, role: probe, system_prompt: "You are prober.",
     models: [{provider: fakellm, model: m1}], tools: [remember]}
  - {name: jsoner, role: json, system_prompt: "You are jsoner.", output: json,
     models: [{provider: fakellm, model: m1}]}
"""

PROBE_SCRIPT = """
rules:
  - name: note-it
    match: {system_contains: prober, last_role: user, contains: "slow"}
    respond: {tool_calls: [{name: remember, arguments: {note: "first"}}]}
  - name: answer-slowly
    match: {system_contains: prober, tool_result_for: remember}
    fault: {latency_ms: 2500}
    respond: {text: "done after {last_tool_result}"}
  - name: unknown-tool
    match: {system_contains: prober, last_role: user, contains: "ghost"}
    respond: {tool_calls: [{name: ghost_tool, arguments: {}}]}
  - name: after-ghost
    match: {system_contains: prober, last_role: tool}
    respond: {text: "recovered: {last_tool_result}"}
  - name: not-json
    match: {system_contains: jsoner}
    respond: {text: "Sure! here is your JSON: {oops"}
default: {text: "echo: {last_user}"}
"""


def probe_mesh_args(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "probe_tools.py").write_text(PROBE_TOOLS)
    (tmp_path / "probe.yaml").write_text(PROBE_CONFIG)
    (tmp_path / "script.yaml").write_text(PROBE_SCRIPT)
    return {
        "config": tmp_path / "probe.yaml",
        "script": tmp_path / "script.yaml",
        "env": {"PYTHONPATH": str(tmp_path), "PROBE_FILE": str(tmp_path / "probe.log")},
    }


async def recorded(mesh: Any, conversation: str, kind: str) -> list[dict[str, Any]]:
    rows = (await query.query(mesh.nc, reads.TRACE_SQL, {"id": conversation})).dicts()
    return rows if any(r["kind"] == kind for r in rows) else []


async def stream_messages(mesh: Any, subject: str) -> list[Envelope]:
    sub = await mesh.js.subscribe(
        subject, ordered_consumer=True, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    )
    out = []
    try:
        while True:
            msg = await sub.next_msg(timeout=0.5)
            out.append(bus.decode(msg.data, 10**7))
    except Exception:
        return out
    finally:
        await sub.unsubscribe()


async def test_a_plain_text_task_flows_through_agent_gateway_and_into_clickhouse(
    start_mesh: MeshFactory,
) -> None:
    mesh = await start_mesh()
    await mesh.nc.publish(
        "bl.task.analysis",
        b'{"prompt": "What does 1000 in / 500 out cost?", "conversation_id": "e2e-1"}',
    )
    reply = await client.await_reply(mesh.nc, "e2e-1", timeout=30)
    assert reply.kind.value == "reply", reply
    assert reply.sender == "analyst"
    assert "0.00045" in client.reply_text(reply)  # the calculator really ran

    rows = await wait_for(lambda: recorded(mesh, "e2e-1", "reply"), timeout=20, what="rows")
    kinds = [r["kind"] for r in rows]
    for kind in ("task", "llm_response", "tool_result", "reply"):
        assert kind in kinds, kinds
    assert len({r["trace_id"] for r in rows}) == 1  # one task, one trace
    llm_rows = [r for r in rows if r["kind"] == "llm_response"]
    assert all(r["input_tokens"] > 0 and r["output_tokens"] > 0 for r in llm_rows)
    assert len({r["id"] for r in rows}) == len(rows)  # no duplicate rows

    # the provider key (set for every test mesh) never reaches messages, rows or logs
    leaked = await query.query(
        mesh.nc,
        "SELECT count() FROM bl_messages WHERE position(payload, {k:String}) > 0",
        {"k": API_KEY},
    )
    assert leaked.rows[0][0] == 0
    for name in ("agent", "gateway", "recorder", "fakellm"):
        assert API_KEY not in mesh.logs(name)


async def test_the_cli_submits_to_a_role_waits_and_prints_the_reply(
    start_mesh: MeshFactory,
) -> None:
    mesh = await start_mesh()
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "beamline"),
        "submit",
        "analysis",
        "What does it cost?",
        "--wait",
        "--timeout",
        "30",
        env={**os.environ, **mesh.mesh.env()},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, out.decode()
    assert "That call costs 0.00045 dollars." in out.decode()


async def test_beamline_trace_finds_a_task_by_its_conversation_and_by_its_trace_id(
    start_mesh: MeshFactory,
) -> None:
    mesh = await start_mesh()
    conversation = await client.submit(mesh.nc, subjects.task("analysis"), "What does it cost?")
    await client.await_reply(mesh.nc, conversation, timeout=30)

    async def by_conversation() -> list[dict[str, Any]] | None:
        code, out = await mesh.cli("trace", conversation, "--json")
        rows: list[dict[str, Any]] = json.loads(out) if code == 0 else []
        return rows if any(r["kind"] == "reply" for r in rows) else None

    rows = await wait_for(by_conversation, timeout=20, what="the task recorded")
    [trace_id] = {r["trace_id"] for r in rows}
    # the trace id is found in the trace-sorted copy (one read), with the same messages
    code, out = await mesh.cli("trace", trace_id, "--json")
    assert code == 0, out
    assert [r["id"] for r in json.loads(out)] == [r["id"] for r in rows]
    fast = await query.query(mesh.nc, reads.TRACE_BY_TRACE_SQL, {"id": trace_id})
    assert [r["id"] for r in fast.dicts()] == [r["id"] for r in rows]
    code, out = await mesh.cli("trace", "no-such-id")
    assert code == 1, out


async def test_a_task_to_a_named_agent_replies_on_its_reply_to_subject(
    start_mesh: MeshFactory,
) -> None:
    mesh = await start_mesh()
    reply_to = mesh.nc.new_inbox()  # under this user's inbox prefix: only it may read there
    inbox = await mesh.nc.subscribe(reply_to)
    await mesh.nc.publish(
        subjects.inbox("writer"),
        json.dumps({"prompt": "Describe Beamline", "reply_to": reply_to}).encode(),
    )
    msg = await inbox.next_msg(timeout=30)
    reply = bus.decode(msg.data, 10**6)
    assert reply.sender == "writer" and "OTP" in client.reply_text(reply)
    calls = await mesh.fakellm_calls()
    assert calls[-1]["endpoint"] == "/v1/messages"  # the writer talks Anthropic


def readme_block(heading: str) -> str:
    """The first python code block under a README heading, exactly as a user copies it."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(heading, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


async def test_the_readme_nats_py_example_runs(start_mesh: MeshFactory, tmp_path: Path) -> None:
    mesh = await start_mesh()
    example = tmp_path / "example.py"
    example.write_text(readme_block("### With nats-py"))
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(example)],
        env={"BEAMLINE_NATS_URL": mesh.mesh.nats_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "escalates to its parent" in out.stdout


async def test_a_host_killed_mid_conversation_resumes_without_repeating_llm_or_tool_calls(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    mesh = await start_mesh(**probe_mesh_args(tmp_path))
    probe = tmp_path / "probe.log"
    await client.submit(mesh.nc, subjects.task("probe"), "please be slow", "kill-1")

    async def second_llm_call_in_flight() -> bool:
        return probe.exists() and len(await mesh.fakellm_calls()) == 2

    await wait_for(second_llm_call_in_flight, timeout=20, what="the slow LLM call")
    mesh.mesh.process("agent").kill()  # kill -9 while the agent waits on the LLM
    await mesh.mesh.respawn("agent")

    reply = await client.await_reply(mesh.nc, "kill-1", timeout=30)
    assert client.reply_text(reply) == "done after noted: first"
    assert probe.read_text().splitlines() == ["first"]  # the tool ran once
    assert [c["rule"] for c in await mesh.fakellm_calls()] == ["note-it", "answer-slowly"]
    replies = await stream_messages(mesh, subjects.reply("kill-1"))
    assert len({r.id for r in replies}) == 1


async def test_bad_input_is_dead_lettered_with_a_reason_and_recorded(
    start_mesh: MeshFactory,
) -> None:
    mesh = await start_mesh()
    bad = {
        "bl.task.research": [b'{"prompt": "unterminated', b'{"promt": "typo"}', b"x" * 300_000],
        "bl.task.astrology": [b"an unknown role"],
        "bl.agent.nobody.inbox": [b"to an unknown agent"],
    }
    for subject, payloads in bad.items():
        for data in payloads:
            await mesh.js.publish(subject, data)

    async def dead_letters() -> list[Envelope]:
        found = await stream_messages(mesh, subjects.DLQ_ALL)
        return found if len(found) >= 5 else []

    letters = await wait_for(dead_letters, timeout=20, what="5 dead letters")
    reasons = sorted(getattr(d.payload, "reason", "") for d in letters)
    assert reasons == sorted(
        ["not_json", "invalid_schema", "oversized", "unknown_role", "unknown_recipient"]
    )
    oversized = next(d for d in letters if getattr(d.payload, "reason", "") == "oversized")
    assert getattr(oversized.payload, "original_bytes", 0) == 300_000

    async def all_recorded() -> bool:
        result = await query.query(
            mesh.nc, "SELECT count() FROM bl_messages FINAL WHERE kind = 'dead_letter'"
        )
        return bool(result.rows[0][0] >= 5)

    await wait_for(all_recorded, timeout=20, what="dead letters recorded")
    # and the host still serves good work
    conversation = await client.submit(mesh.nc, subjects.task("writing"), "still alive?")
    assert (await client.await_reply(mesh.nc, conversation, timeout=30)).kind.value == "reply"


async def test_an_unknown_tool_is_reported_to_the_llm_and_the_task_still_completes(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    mesh = await start_mesh(**probe_mesh_args(tmp_path))
    conversation = await client.submit(mesh.nc, subjects.task("probe"), "call the ghost")
    reply = await client.await_reply(mesh.nc, conversation, timeout=30)
    assert "recovered" in client.reply_text(reply)
    assert "unknown_tool" in client.reply_text(reply)
    journal = await stream_messages(mesh, f"bl.journal.prober.{conversation}")
    results = [e.payload for e in journal if e.kind.value == "tool_result"]
    assert [getattr(r, "error_reason", None) for r in results] == ["unknown_tool"]


async def test_an_llm_answer_that_is_not_the_json_required_gets_an_error_reply(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    mesh = await start_mesh(**probe_mesh_args(tmp_path))
    conversation = await client.submit(mesh.nc, subjects.task("json"), "give me json")
    reply = await client.await_reply(mesh.nc, conversation, timeout=30)
    assert reply.kind.value == "error"
    assert getattr(reply.payload, "reason", "") == "invalid_llm_output"


HANG_CONFIG = """
version: 1
providers:
  slow: {kind: openai, base_url: "${BEAMLINE_FAKELLM_URL}/v1", timeout_s: 0.5,
         max_attempts: 1, breaker_fail_max: 2, breaker_reset_s: 60, context_window: 128000}
agents:
  - {name: waiter, role: wait, models: [{provider: slow, model: m}]}
"""
HANG_SCRIPT = "rules:\n  - {name: hang, match: {}, fault: {hang: true}}\ndefault: {text: unused}\n"


async def one_provider_mesh(
    start_mesh: MeshFactory, tmp_path: Path, script: str, transient_retries: int
) -> MeshHandle:
    """Agent `waiter` (role `wait`) on provider `slow`, which fakellm answers by `script`."""
    (tmp_path / "one.yaml").write_text(HANG_CONFIG)
    (tmp_path / "one-script.yaml").write_text(script)
    mesh: MeshHandle = await start_mesh(
        config=tmp_path / "one.yaml",
        script=tmp_path / "one-script.yaml",
        env={"BEAMLINE_AGENT_TRANSIENT_RETRIES": str(transient_retries)},
    )
    return mesh


async def waiter_reply(mesh: MeshHandle, prompt: str) -> Envelope:
    conversation = await client.submit(mesh.nc, subjects.task("wait"), prompt)
    return await client.await_reply(mesh.nc, conversation, timeout=30)


async def test_a_hanging_provider_times_out_opens_the_breaker_and_the_event_is_recorded(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    mesh = await one_provider_mesh(start_mesh, tmp_path, HANG_SCRIPT, transient_retries=0)
    reply = await waiter_reply(mesh, "question 0")
    assert getattr(reply.payload, "reason", None) == "provider_timeout"
    # the second timeout trips the breaker: the agent, with no other provider, pauses with
    # the task in hand instead of failing it, and the provider is not called again
    await client.submit(mesh.nc, subjects.task("wait"), "question 1")

    async def paused() -> bool:
        health = json.loads((await mesh.nc.request(subjects.health("agent"), b"", 2)).data)
        return any(a["state"] == "paused" and a["paused_on"] == "slow" for a in health["agents"])

    await wait_for(paused, timeout=30, what="waiter paused on slow")
    assert len(await mesh.fakellm_calls()) == 2

    async def breaker_event_recorded() -> list[list[Any]]:
        result = await query.query(
            mesh.nc,
            "SELECT subject, payload FROM bl_messages FINAL WHERE kind = 'event' "
            "AND subject = {s:String}",
            {"s": "bl.events.gateway.breaker_opened"},
        )
        return result.rows

    rows = await wait_for(breaker_event_recorded, timeout=20, what="breaker_opened recorded")
    assert json.loads(rows[0][1])["data"]["provider"] == "slow"


REFUSE_SCRIPT = (
    "rules:\n  - {name: refuse, match: {}, fault: {status: 400, message: 'unknown model m'}}\n"
    "default: {text: unused}\n"
)


async def test_a_provider_that_refuses_the_request_fails_the_task_at_once_without_retries(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    mesh = await one_provider_mesh(start_mesh, tmp_path, REFUSE_SCRIPT, transient_retries=3)
    reply = await waiter_reply(mesh, "question")
    assert getattr(reply.payload, "reason", None) == "provider_rejected"
    assert "unknown model m" in getattr(reply.payload, "message", "")
    # the same request would be refused again: neither the gateway nor the agent retried
    assert [c["status"] for c in await mesh.fakellm_calls()] == [400]


async def test_the_demo_that_make_run_starts_answers_every_task_and_prints_a_trace(
    tmp_path: Path,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "beamline"),
        "demo",
        "--nats-port",
        str(free_port()),
        "--fakellm-port",
        str(free_port()),
        "--monitor-port",
        str(free_port()),
        "--data-dir",
        str(tmp_path / "demo"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    finally:
        if proc.returncode is None:
            proc.kill()
    text = out.decode()
    assert proc.returncode == 0, text
    assert text.count("← ") == 14 and text.count("error [") == 1, text  # the budget's refusal
    assert "tool search_notes" in text and "reply:" in text  # the printed trace
    # an agent killed mid-task: rest_for_one restarts it and its later sibling
    assert "analysis restarted ['researcher', 'analyst']" in text, text
    # a host killed: its agents re-homed, a healthy agent elsewhere left alone
    assert "kill -9 of host hot-" in text and "researcher re-homed: hot-" in text, text
    assert "writer re-homed" not in text, text
    # both conversations resumed from the journal, no LLM call made twice
    assert text.count("0 LLM calls repeated") == 2, text
    # the guards: a failing provider's traffic moves over and back
    assert "scout: failed over fakellm-eu -> fakellm" in text, text
    assert "scout: failed back fakellm -> fakellm-eu" in text, text
    # an overspending subtree stopped before the call that would overspend, 4 drafts kept
    assert "drafts's budget is spent" in text and "error [budget_exhausted]" in text, text
    assert "partial results kept: 4 drafts answered" in text, text
    # a loop corrected with an addendum, then escalated; the human's answer resumes it
    assert text.count("loop guard: fixer called the tool `search_notes` 3 times") == 2, text
    assert "fixer restarted with an addendum" in text and "fixer suspended" in text, text
    assert "← fixing (fixer): Fixed: the runbook says" in text, text
    # a long conversation summarised before it overflows the model's window, and answered
    assert "archivist: " in text and "older turns summarised" in text, text
    assert "← archiving (archivist): Six days read" in text, text


@needs_local_nats
async def test_the_mesh_keeps_serving_after_the_nats_server_restarts(
    start_mesh: MeshFactory,
) -> None:
    mesh = await start_mesh()
    first = await client.submit(mesh.nc, subjects.task("writing"), "before the restart")
    assert (await client.await_reply(mesh.nc, first, timeout=30)).kind.value == "reply"

    nats = mesh.mesh.process("nats-server")
    nats.kill()  # kill -9: JetStream recovers from its store on the same port
    await mesh.mesh.respawn("nats-server")
    await wait_for(lambda: mesh.nc.is_connected, timeout=20, what="test client reconnected")

    async def answered_after_restart() -> bool:
        conversation = await client.submit(mesh.nc, subjects.task("writing"), "after it")
        reply = await client.await_reply(mesh.nc, conversation, timeout=15)
        return reply.kind.value == "reply"

    assert await wait_for(answered_after_restart, timeout=60, interval=0.5, what="a reply")
    for name in ("agent", "gateway", "recorder"):
        assert mesh.mesh.process(name).alive(), mesh.logs(name)[-2000:]


async def test_a_graceful_stop_finishes_the_message_in_hand_before_exiting(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    mesh = await start_mesh(**probe_mesh_args(tmp_path))
    await client.submit(mesh.nc, subjects.task("probe"), "please be slow", "stop-1")

    async def slow_call_in_flight() -> bool:
        return len(await mesh.fakellm_calls()) == 2

    await wait_for(slow_call_in_flight, timeout=20, what="the slow LLM call")
    code = await asyncio.to_thread(mesh.mesh.process("agent").stop, 20)
    assert code == 0, mesh.logs("agent")[-2000:]
    # it finished the task it held (journal, reply, ack) before exiting
    replies = await stream_messages(mesh, subjects.reply("stop-1"))
    assert [client.reply_text(r) for r in replies] == ["done after noted: first"]
    mailboxes = await mesh.js.consumers_info(subjects.STREAM_MAILBOX)
    assert sum(c.num_ack_pending for c in mailboxes) == 0  # acked before the exit
    assert len(await mesh.fakellm_calls()) == 2


async def test_a_message_that_keeps_killing_hosts_is_dead_lettered_as_poison(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    args = probe_mesh_args(tmp_path)
    args["env"]["BEAMLINE_AGENT_MAX_DELIVERIES"] = "1"
    mesh = await start_mesh(**args)
    await client.submit(mesh.nc, subjects.task("probe"), "please be slow", "poison-1")

    async def slow_call_in_flight() -> bool:
        return len(await mesh.fakellm_calls()) == 2

    await wait_for(slow_call_in_flight, timeout=20, what="the slow LLM call")
    mesh.mesh.process("agent").kill()  # the host dies holding the message: delivery 1
    await mesh.mesh.respawn("agent")  # the rewound shard replays it: delivery 2 > 1

    reply = await client.await_reply(mesh.nc, "poison-1", timeout=30)
    assert getattr(reply.payload, "reason", None) == "poison", reply
    letters = await stream_messages(mesh, subjects.dlq("agent"))
    assert [getattr(d.payload, "reason", None) for d in letters] == ["poison"]
    assert len(await mesh.fakellm_calls()) == 2  # not tried again


async def test_with_the_gateway_down_a_task_fails_with_a_reason_and_work_resumes_after(
    start_mesh: MeshFactory,
) -> None:
    mesh = await start_mesh(
        env={"BEAMLINE_AGENT_TRANSIENT_RETRIES": "1", "BEAMLINE_AGENT_RETRY_BASE_S": "0.05"}
    )
    mesh.mesh.process("gateway").kill()
    down = await client.submit(mesh.nc, subjects.task("writing"), "anyone there?")
    reply = await client.await_reply(mesh.nc, down, timeout=30)
    assert getattr(reply.payload, "reason", None) == "gateway_unavailable", reply
    assert mesh.mesh.process("agent").alive()

    await mesh.mesh.respawn("gateway")
    back = await client.submit(mesh.nc, subjects.task("writing"), "and now?")
    assert (await client.await_reply(mesh.nc, back, timeout=30)).kind.value == "reply"
