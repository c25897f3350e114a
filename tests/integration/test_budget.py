"""Budget scenarios on a real mesh: nats-server, fakellm over HTTP, the budget service,
gateway, recorder (ClickHouse engine), supervisor and agent host as processes. Asserts on
what fakellm received, on the supervisor's and budget service's events, and on what the
recorder stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from beamline import budget_ops, nats_auth, query, subjects
from beamline.budget import Budget
from beamline.client import await_reply, submit
from beamline.envelope import ChatMessage, Envelope, ErrorPayload, Kind, LLMRequestPayload
from beamline.testing import wait_for
from tests.integration.conftest import MeshFactory, MeshHandle
from tests.integration.test_supervision import FAST, admin, events, named

HERE = Path(__file__).parent
TREE = HERE / "budget.yaml"
SCRIPT = HERE / "budget-script.yaml"
PROMPT = "x" * 200  # about 50 input tokens a call, so a few calls reach a 300-token budget
MAX_CALLS = 12  # far more than any budget here allows


async def budget_mesh(start_mesh: MeshFactory) -> MeshHandle:
    mesh: MeshHandle = await start_mesh(config=TREE, script=SCRIPT, env=FAST)

    async def tree_up() -> bool:
        evs = await events(mesh)
        return {"spender", "alpha", "beta", "free"} <= {
            e.get("child") for e in named(evs, "child_started")
        }

    await wait_for(tree_up, timeout=30, what="the tree to start")
    return mesh


async def ask(mesh: MeshHandle, agent: str, prompt: str = PROMPT) -> tuple[str, Envelope]:
    conversation = await submit(mesh.nc, subjects.inbox(agent), prompt)
    return conversation, await await_reply(mesh.nc, conversation, timeout=30)


async def calls(mesh: MeshHandle, rule: str) -> int:
    return sum(1 for c in await mesh.fakellm_calls() if c["rule"] == rule)


async def spend_until_refused(mesh: MeshHandle, agents: list[str]) -> tuple[list[str], str]:
    """Tasks to `agents` in turn until one is refused: (answered conversations, refused one)."""
    answered: list[str] = []
    for i in range(MAX_CALLS):
        conversation, reply = await ask(mesh, agents[i % len(agents)])
        if isinstance(reply.payload, ErrorPayload):
            assert reply.payload.reason == "budget_exhausted", reply.payload
            assert "cannot cover this call" in reply.payload.message
            return answered, conversation
        answered.append(conversation)
    raise AssertionError(f"no call refused in {MAX_CALLS}")


async def budget_events(mesh: MeshHandle, name: str) -> list[dict[str, Any]]:
    return await mesh.events(subjects.event("budget", name))


async def used_tokens(mesh: MeshHandle, agents: set[str]) -> int:
    """What the gateway reported the provider billed for these agents' calls."""
    completed = await mesh.events(subjects.LLM_CALL_COMPLETED)
    return sum(
        e["input_tokens"] + e["output_tokens"] for e in completed if e.get("agent") in agents
    )


async def recorded(mesh: MeshHandle, sql: str, **params: str) -> list[list[Any]]:
    return (await query.query(mesh.nc, sql, params)).rows


async def account(mesh: MeshHandle, name: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = (await budget_ops.show(mesh.nc, name))["accounts"]
    assert len(rows) == 1
    return rows[0]


async def settled(mesh: MeshHandle, name: str, calls: int) -> dict[str, Any]:
    """The account once `calls` calls are settled from the gateway's events, none held."""

    async def done() -> dict[str, Any] | None:
        row = await account(mesh, name)
        return row if row["calls"] == calls and row["held_tokens"] == 0 else None

    found: dict[str, Any] = await wait_for(done, timeout=20, what=f"{name}'s calls settled")
    return found


async def test_an_agent_over_budget_is_stopped_before_its_next_call_and_a_raise_resumes_it(
    start_mesh: MeshFactory,
) -> None:
    mesh = await budget_mesh(start_mesh)
    answered, refused_conv = await spend_until_refused(mesh, ["spender"])
    assert answered  # 300 tokens cover a few calls of ~110 estimated, ~55 actual tokens

    # the refused call never reached the provider; the spend stays under the limit
    assert await calls(mesh, "spender") == len(answered)
    [refusal] = await budget_events(mesh, "reservation_refused")
    assert refusal["account"] == "agent:spender" and refusal["newly_exhausted"]
    assert refusal["spent_tokens"] + refusal["held_tokens"] + refusal["needed_tokens"] > 300
    spent = await settled(mesh, "spender", len(answered))
    assert spent["spent_tokens"] <= 300
    assert await used_tokens(mesh, {"spender"}) == spent["spent_tokens"]

    # the supervisor stops the agent with exit budget_exhausted; its parent keeps it stopped
    async def stopped() -> list[dict[str, Any]]:
        return named(await events(mesh), "child_removed", "spender")

    [removed] = await wait_for(stopped, timeout=20, what="spender stopped for its budget")
    assert removed["reason"] == "budget_exhausted" and removed["supervisor"] == "root"
    evs = await events(mesh)
    [exhausted] = named(evs, "budget_exhausted", "spender")
    [exited] = named(evs, "child_exited", "spender")
    assert exited["exit"] == "budget_exhausted" and not named(evs, "child_restarted", "spender")
    # the partial results: each answered conversation, with its settled call
    assert {c["conversation_id"] for c in exhausted["conversations"]} == set(answered)
    # (settled, or still in flight when the report was sent)
    assert all(c["calls"] + c["in_flight"] == 1 for c in exhausted["conversations"])
    row = next(r for r in (await admin(mesh, "ps"))["result"] if r["agent"] == "spender")
    assert row["state"] == "stopped"

    # a task sent meanwhile waits in the mailbox, with no call made ...
    waiting = await submit(mesh.nc, subjects.inbox("spender"), PROMPT)
    assert await calls(mesh, "spender") == len(answered)
    # ... until the budget is raised at run time, which restarts the agent
    raised = await budget_ops.raise_budget(mesh.nc, "spender", Budget(tokens=1000))
    assert raised["was_exhausted"] and raised["restarted"]
    reply = await await_reply(mesh.nc, waiting, timeout=30)
    assert getattr(reply.payload, "text", None) == "ok"
    assert await calls(mesh, "spender") == len(answered) + 1
    [change] = await budget_events(mesh, "budget_raised")
    assert change["to"] == {"tokens": 1000} and change["requested_by"] == "cli"

    # recorded: the decision, and the refused task's error reply
    async def in_clickhouse() -> list[list[Any]]:
        return await recorded(
            mesh,
            "SELECT subject FROM bl_messages FINAL WHERE subject = {s:String}",
            s="bl.events.supervisor.budget_exhausted",
        )

    await wait_for(in_clickhouse, timeout=20, what="budget_exhausted recorded")
    [[payload]] = await recorded(
        mesh,
        "SELECT payload FROM bl_messages FINAL WHERE kind = 'error' AND conversation_id = {c:String}",
        c=refused_conv,
    )
    assert json.loads(payload)["reason"] == "budget_exhausted"


async def test_a_supervisor_budget_covers_its_two_agents_and_stops_its_subtree(
    start_mesh: MeshFactory,
) -> None:
    mesh = await budget_mesh(start_mesh)
    answered, _ = await spend_until_refused(mesh, ["alpha", "beta"])
    made = await calls(mesh, "alpha") + await calls(mesh, "beta")
    assert made == len(answered) >= 2  # both agents spent from the team's budget
    team = await settled(mesh, "team", len(answered))
    assert team["spent_usd"] <= 0.3 and team["exhausted"]
    # $1,000 per million tokens, in and out: the team's cost is its agents' tokens / 1,000
    assert team["spent_usd"] == pytest.approx(await used_tokens(mesh, {"alpha", "beta"}) / 1000)
    [refusal] = await budget_events(mesh, "reservation_refused")
    assert refusal["account"] == "supervisor:team"

    async def team_removed() -> list[dict[str, Any]]:
        return named(await events(mesh), "child_removed", "team")

    [removed] = await wait_for(team_removed, timeout=20, what="team stopped for its budget")
    assert removed["supervisor"] == "root" and removed["reason"] == "budget_exhausted"
    evs = await events(mesh)
    # the whole subtree is stopped, in reverse start order, then the parent sees the exit
    stops = [e["child"] for e in named(evs, "child_stopped") if e["supervisor"] == "team"]
    assert stops == ["beta", "alpha"]
    [exited] = named(evs, "child_exited", "team")
    assert exited["exit"] == "budget_exhausted"
    [exhausted] = named(evs, "budget_exhausted", "team")
    assert {c["agent"] for c in exhausted["conversations"]} == {"alpha", "beta"}
    code, shown = await mesh.cli("budget", "show", "team")
    assert code == 0, shown
    header, row = shown.splitlines()
    assert header.split()[:2] == ["ACCOUNT", "LIMIT"] and row.split()[0] == "supervisor:team"
    assert row.split()[-1] == "yes"  # exhausted
    code, out = await mesh.cli("budget", "raise", "team", "--usd", "0.1")
    assert code == 2 and "below the current limit 0.3" in out, out
    tree = (await admin(mesh, "tree"))["result"]
    assert not next(c for c in tree["children"] if c.get("supervisor") == "team")["up"]
    # a sibling outside the subtree works on
    _, reply = await ask(mesh, "free", "still here?")
    assert getattr(reply.payload, "text", None) == "ok"


async def test_the_budget_service_keeps_its_spend_across_a_restart_and_refuses_bad_input(
    start_mesh: MeshFactory,
) -> None:
    mesh = await budget_mesh(start_mesh)
    for _ in range(2):
        _, reply = await ask(mesh, "spender", "short")
        assert getattr(reply.payload, "text", None) == "ok"

    before = await settled(mesh, "spender", 2)

    # down: a budgeted agent's call is refused with a clear reason, and not made
    mesh.mesh.process("budget").kill()
    agent = await mesh.connect_as(nats_auth.Role.AGENT, "test-agent")
    try:
        request = Envelope(
            kind=Kind.LLM_REQUEST,
            sender="spender",
            recipient="gateway.fakellm",
            conversation_id="budget-down",
            payload=LLMRequestPayload(
                provider="fakellm",
                model="m",
                messages=(ChatMessage(role="user", content="hi"),),
                max_tokens=50,
            ),
        )
        msg = await agent.request(
            subjects.llm("fakellm"), request.model_dump_json().encode(), timeout=10
        )
    finally:
        await agent.close()
    answer = Envelope.model_validate_json(msg.data)
    assert isinstance(answer.payload, ErrorPayload)
    assert answer.payload.reason == "budget_unavailable"
    assert "start services/budget" in answer.payload.message
    assert await calls(mesh, "spender") == 2

    await mesh.mesh.respawn("budget")
    after = await account(mesh, "spender")
    assert (after["spent_tokens"], after["calls"]) == (before["spent_tokens"], 2)
    _, reply = await ask(mesh, "spender", "short")
    assert getattr(reply.payload, "text", None) == "ok"

    # bad input to the budget service gets an error that names what is wrong
    gateway = await mesh.connect_as(nats_auth.Role.GATEWAY, "test-gateway")
    try:
        for body, reason, words in (
            (b"not json", "not_json", "not JSON"),
            (b"{}", "invalid_schema", "request_id: Field required"),
            (
                b'{"request_id": "r", "agent": "spender", "provider": "fakellm", "model": "m",'
                b' "input_tokens": -1, "output_tokens": 5}',
                "invalid_schema",
                "input_tokens: Input should be greater than or equal to 0",
            ),
            (
                b'{"request_id": "r", "agent": "nobody", "provider": "fakellm", "model": "m",'
                b' "input_tokens": 1, "output_tokens": 5}',
                "unknown_recipient",
                "no agent named 'nobody'",
            ),
        ):
            reply_msg = await gateway.request(subjects.BUDGET_RESERVE, body, timeout=10)
            got = json.loads(reply_msg.data)
            assert not got["ok"] and got["reason"] == reason and words in got["error"], got
    finally:
        await gateway.close()
    lower = await mesh.nc.request(
        subjects.BUDGET_RAISE,
        b'{"name": "spender", "budget": {"tokens": 10}}',
        timeout=10,
    )
    assert "below the current limit 300" in json.loads(lower.data)["error"]
