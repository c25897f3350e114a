"""Loop guard scenarios on a real mesh: nats-server, fakellm over HTTP, the loop guard,
supervisor, gateway, recorder (ClickHouse engine) and agent host as processes. Asserts on
the recorded events, on the escalation messages a plain NATS subscriber gets, and on what
fakellm received."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.subscription import Subscription

from beamline import nats_auth, query, subjects
from beamline.client import await_reply, reply_text, submit
from beamline.journal import read_entries
from beamline.testing import wait_for
from tests.integration.conftest import MeshFactory, MeshHandle
from tests.integration.test_supervision import FAST, admin, events, named

HERE = Path(__file__).parent
TREE = HERE / "loopguard.yaml"
SCRIPT = HERE / "loopguard-script.yaml"
GUARDED = "Loop guard: in this conversation you called the tool `search_notes` 3 times"


async def guard_mesh(start_mesh: MeshFactory) -> MeshHandle:
    mesh: MeshHandle = await start_mesh(config=TREE, script=SCRIPT, env=FAST)

    async def tree_up() -> bool:
        started = {e.get("child") for e in named(await events(mesh), "child_started")}
        return {"looper", "stubborn", "waiter"} <= started

    await wait_for(tree_up, timeout=30, what="the tree to start")
    return mesh


async def supervisor_event(mesh: MeshHandle, name: str, agent: str) -> dict[str, Any]:
    """The supervisor's one `name` event about `agent`, once published (events go out off
    the supervisor's hot path, so right after its answer one may not be stored yet)."""

    async def one() -> list[dict[str, Any]]:
        return named(await events(mesh), name, agent)

    found: list[dict[str, Any]] = await wait_for(one, timeout=20, what=f"{name} for {agent}")
    assert len(found) == 1, found
    return found[0]


async def loops(mesh: MeshHandle, agent: str) -> list[dict[str, Any]]:
    found = await mesh.events(subjects.event("loopguard", "loop_detected"))
    return [e for e in found if e["agent"] == agent]


async def calls(mesh: MeshHandle, rule: str) -> list[dict[str, Any]]:
    return [c for c in await mesh.fakellm_calls() if c["rule"] == rule]


def system_prompt(call: dict[str, Any]) -> str:
    return str(call["body"]["messages"][0]["content"])


async def state(mesh: MeshHandle, agent: str) -> str:
    rows = (await admin(mesh, "ps"))["result"]
    return str(next(r for r in rows if r["agent"] == agent)["state"])


async def guard_health(mesh: MeshHandle) -> dict[str, Any]:
    """The loop guard's own account (entries seen, loops, commands, last error): what a
    failed scenario is explained by."""
    msg = await mesh.nc.request(subjects.health("loopguard"), b"", timeout=5)
    found: dict[str, Any] = json.loads(msg.data)
    return found


async def next_escalation(sub: Subscription, name: str) -> dict[str, Any]:
    """The next message on the escalation subject named `name`: its data, the escalation."""
    while True:
        env = json.loads((await sub.next_msg(timeout=30)).data)
        if env["payload"]["name"] == name:
            data: dict[str, Any] = env["payload"]["data"]
            return data


async def test_a_loop_is_seen_on_the_third_identical_call_and_the_agent_restarted_with_an_addendum(
    start_mesh: MeshFactory,
) -> None:
    mesh = await guard_mesh(start_mesh)
    conversation = await submit(mesh.nc, subjects.inbox("looper"), "How do restarts work?")
    reply = await await_reply(mesh.nc, conversation, timeout=30)
    assert reply_text(reply) == "looper: found it another way", await guard_health(mesh)

    # detected once, on the third identical tool call journaled
    [loop] = await loops(mesh, "looper")
    assert (loop["kind"], loop["count"], loop["tool"]) == ("same_tool_call", 3, "search_notes")
    assert loop["arguments"] == '{"query":"restart intensity"}'
    assert (loop["rung"], loop["command"], loop["conversation"]) == (
        "restart",
        "restart",
        conversation,
    )
    journal = await read_entries(mesh.js, subjects.journal("looper", conversation))
    results = [env.id for _, env in journal if env.kind.value == "tool_result"]
    assert loop["entry"] == results[2]

    # the supervisor restarted it with the addendum: not a crash, no intensity spent
    restarted = await supervisor_event(mesh, "guard_restarted", "looper")
    assert GUARDED in restarted["addendum"]
    evs = await events(mesh)
    assert not named(evs, "child_exited", "looper") and not named(evs, "child_restarted", "looper")
    row = next(r for r in (await admin(mesh, "ps"))["result"] if r["agent"] == "looper")
    assert row["restarts"] == 0 and row["generation"] == 2

    # what fakellm received: the same prompt while looping, then the addendum, which ended it
    looping, guarded = await calls(mesh, "looper-loops"), await calls(mesh, "looper-guarded")
    assert len(looping) >= 3 and all("Loop guard" not in system_prompt(c) for c in looping)
    [answered] = guarded
    assert system_prompt(answered).startswith("I am looper.\n\n" + GUARDED)
    # the restarted incarnation went on with the conversation from its journal
    assert len(answered["body"]["messages"]) > 3 * 2

    # recorded in ClickHouse, in the looping task's trace
    async def recorded() -> list[list[Any]]:
        sql = (
            "SELECT trace_id FROM bl_messages FINAL WHERE subject = {s:String}"
            " AND conversation_id = {c:String}"
        )
        return (
            await query.query(
                mesh.nc, sql, {"s": "bl.events.loopguard.loop_detected", "c": conversation}
            )
        ).rows

    [[trace]] = await wait_for(recorded, timeout=20, what="loop_detected recorded")
    assert trace == reply.trace_id

    # the supervisor keeps the addendum and sends it with every start of the agent (a
    # restart by an operator here; a re-home or a failover's start alike)
    await admin(mesh, "restart", "looper")
    await submit(mesh.nc, subjects.inbox("looper"), "And the period?", conversation)
    follow_up = await await_reply(mesh.nc, conversation, timeout=30, after=1)
    assert reply_text(follow_up) == "looper: found it another way"
    assert GUARDED in system_prompt((await calls(mesh, "looper-guarded"))[-1])
    # the loop guard met the conversation at its first entry (Bl-Entry 0) and kept it:
    # it never read the journal back
    health = await guard_health(mesh)
    assert health["conversations"] == 1 and health["replayed"] == 0, health


async def test_a_second_loop_is_escalated_the_agent_waits_and_an_answer_resumes_it(
    start_mesh: MeshFactory,
) -> None:
    mesh = await guard_mesh(start_mesh)
    human = await mesh.connect_as(nats_auth.Role.CLIENT, "test-human")
    try:
        escalations = await human.subscribe(subjects.escalation("stubborn"))
        await human.flush()
        conversation = await submit(mesh.nc, subjects.inbox("stubborn"), "How do restarts work?")

        opened = await next_escalation(escalations, "escalation_opened")
        assert opened["agent"] == "stubborn" and opened["conversation_id"] == conversation
        assert opened["status"] == "open" and opened["on_timeout"] == "resume"
        assert opened["loop"]["tool"] == "search_notes" and opened["loop"]["count"] == 3
        assert opened["deadline"] > opened["opened_at"]
        assert f"beamline escalation answer {opened['id']}" in opened["how_to_answer"]
        first, second = await wait_for(
            lambda: _two(loops(mesh, "stubborn")), timeout=20, what="two loops"
        )
        assert (first["rung"], second["rung"]) == ("restart", "escalate")
        assert second["escalation"] == opened["id"]

        # suspended: a follow-up sent meanwhile waits in its mailbox, no call made for it
        await wait_for(
            lambda: _is(state(mesh, "stubborn"), "suspended"), timeout=20, what="suspended"
        )
        made = len(await calls(mesh, "stubborn-loops"))
        await submit(mesh.nc, subjects.inbox("stubborn"), "And now?", conversation)
        assert len(await calls(mesh, "stubborn-loops")) == made
        suspended = await supervisor_event(mesh, "agent_suspended", "stubborn")
        assert suspended["escalation"] == opened["id"]

        code, out = await mesh.cli("escalation", "list")
        assert code == 0 and opened["id"] in out and "stubborn" in out, out
        code, out = await mesh.cli(
            "escalation", "answer", opened["id"], "--resume", "--say", "use the cache"
        )
        assert code == 0, out
        answer = json.loads(out)
        assert answer["escalation"]["status"] == "answered"
        assert answer["agent_state"] == "running"

        closed = await next_escalation(escalations, "escalation_closed")
        assert (closed["id"], closed["outcome"], closed["say"]) == (
            opened["id"],
            "resume",
            "use the cache",
        )
        # the task in hand, then the follow-up: the human's advice is in the conversation's
        # system prompt now
        for earlier in (0, 1):
            reply = await await_reply(mesh.nc, conversation, timeout=30, after=earlier)
            assert reply_text(reply) == "stubborn: answered from the cache"
        advised = await calls(mesh, "stubborn-advised")
        assert len(advised) == 2
        assert "A human operator reviewed this loop and says: use the cache" in system_prompt(
            advised[0]
        )
        resumed = await supervisor_event(mesh, "agent_resumed", "stubborn")
        assert "use the cache" in resumed["addendum"]
    finally:
        await human.close()


async def test_an_unanswered_escalation_times_out_and_bad_answers_get_clear_errors(
    start_mesh: MeshFactory,
) -> None:
    mesh = await guard_mesh(start_mesh)
    human = await mesh.connect_as(nats_auth.Role.CLIENT, "test-human")
    try:
        escalations = await human.subscribe(subjects.escalation("waiter"))
        await human.flush()
        await submit(mesh.nc, subjects.inbox("waiter"), "How do restarts work?")
        opened = await next_escalation(escalations, "escalation_opened")
        # the loop guard restarts meanwhile: its escalations, their deadlines and its
        # unanswered commands are persisted, so the timeout still applies
        await mesh.mesh.respawn("loopguard")
        closed = await next_escalation(escalations, "escalation_closed")
        assert (closed["status"], closed["outcome"], closed["answered_by"]) == (
            "timed_out",
            "stop",
            "timeout",
        )
        assert closed["closed_at"] >= opened["deadline"]
        await wait_for(lambda: _is(state(mesh, "waiter"), "stopped"), timeout=20, what="stopped")
        stopped = await supervisor_event(mesh, "guard_stopped", "waiter")
        assert stopped["escalation"] == opened["id"]

        # answering it now, or an escalation that never was, or for an unknown agent
        for argv, words in (
            (
                ("answer", opened["id"], "--resume"),
                "is already closed (timed_out: stop by timeout)",
            ),
            (("answer", "esc-nope", "--stop"), "no escalation 'esc-nope'"),
            (("list", "--agent", "nobody"), "no agent named 'nobody'"),
            (("answer", opened["id"], "--stop", "--say", "x"), "--say goes with --resume"),
        ):
            code, out = await mesh.cli("escalation", *argv)
            assert code == 2 and words in out, (argv, out)

        # malformed requests, as a plain NATS client sends them
        for body, reason, words in (
            (b"not json", "not_json", "not JSON"),
            (b'{"id": "x", "action": "pause"}', "invalid_schema", "action: Input should be"),
            (b'{"action": "stop"}', "invalid_schema", "id: Field required"),
            (
                b'{"id": "esc-1", "action": "stop", "agent": "stubborn"}',
                "unknown_recipient",
                "no escalation 'esc-1' for agent 'stubborn'",
            ),
        ):
            got = json.loads(
                (await human.request(subjects.LOOPGUARD_ANSWER, body, timeout=10)).data
            )
            assert not got["ok"] and got["reason"] == reason and words in got["error"], got
    finally:
        await human.close()

    # only the loop guard may command the supervisor; a malformed command is refused, clearly
    guard = await mesh.connect_as(nats_auth.Role.LOOPGUARD, "test-guard")
    try:
        for body, words in (
            (b"{}", "not a valid GuardCommand"),
            (b'{"id": "g1", "action": "restart", "agent": "a.b"}', "agent"),
            (
                b'{"id": "g1", "action": "restart", "agent": "nobody"}',
                "'nobody' is not a supervised agent",
            ),
        ):
            got = json.loads((await guard.request(subjects.GUARD, body, timeout=10)).data)
            assert not got["ok"] and words in got["error"], got
    finally:
        await guard.close()


async def _two(found: Any) -> list[dict[str, Any]] | None:
    items: list[dict[str, Any]] = await found
    return items if len(items) == 2 else None


async def _is(found: Any, expected: str) -> bool:
    try:
        return bool(await found == expected)
    except nats.errors.Error:
        return False
