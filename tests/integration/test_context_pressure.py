"""Context pressure on a real mesh: nats-server, fakellm over HTTP, gateway, recorder
(ClickHouse engine), supervisor and agent host as processes. Agents with a 1,500-token
window read pages of 300 tokens each. The evidence is what fakellm received (every request
estimated with the agents' own estimator, from the wire), the events, and what the recorder
stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from beamline import query, subjects
from beamline.budget import estimate_tokens
from beamline.client import await_reply, reply_text, submit
from beamline.envelope import ChatMessage, ToolCall, ToolSpec
from beamline.testing import wait_for
from services.agent.window import SUMMARISER_SYSTEM, SUMMARY_HEADER
from tests.integration.conftest import MeshFactory, MeshHandle
from tests.integration.context_tools import read_page
from tests.integration.test_supervision import FAST, events, named

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).parent
WINDOW, THRESHOLD = 1500, 0.8
BUDGET = int(WINDOW * THRESHOLD)  # what a request may be estimated at: 1,200 tokens
ENV = {
    **FAST,
    # a refused summarisation is retried once, quickly, like any transient failure
    "BEAMLINE_AGENT_TRANSIENT_RETRIES": "1",
    "BEAMLINE_AGENT_RETRY_BASE_S": "0.05",
    "BEAMLINE_AGENT_RETRY_CAP_S": "0.1",
}


async def context_mesh(start_mesh: MeshFactory) -> MeshHandle:
    mesh: MeshHandle = await start_mesh(
        config=HERE / "context.yaml", script=HERE / "context-script.yaml", env=ENV
    )

    async def tree_up() -> bool:
        started = {e.get("child") for e in named(await events(mesh), "child_started")}
        return {"pager", "restarter"} <= started

    await wait_for(tree_up, timeout=30, what="the tree to start")
    return mesh


async def ask(mesh: MeshHandle, agent: str, prompt: str) -> tuple[str, str]:
    conversation = await submit(mesh.nc, subjects.inbox(agent), prompt)
    reply = await await_reply(mesh.nc, conversation, timeout=60)
    assert reply.kind.value == "reply", reply
    return conversation, reply_text(reply)


def estimate(body: dict[str, Any]) -> int:
    """What the agent's estimator says of a request as fakellm received it (OpenAI wire)."""
    messages = [
        ChatMessage(
            role=m["role"],
            content=m.get("content"),
            tool_calls=tuple(
                ToolCall(
                    id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"]
                )
                for c in m.get("tool_calls") or ()
            ),
            tool_call_id=m.get("tool_call_id"),
        )
        for m in body["messages"]
    ]
    tools = [
        ToolSpec(
            name=t["function"]["name"],
            description=t["function"]["description"],
            parameters=t["function"]["parameters"],
        )
        for t in body.get("tools") or ()
    ]
    return estimate_tokens(messages, tools) + int(body["max_tokens"])


def system(call: dict[str, Any]) -> str:
    return str(call["body"]["messages"][0]["content"])


def is_summary(call: dict[str, Any]) -> bool:
    return system(call) == SUMMARISER_SYSTEM


async def calls_after(mesh: MeshHandle, seq: int) -> list[dict[str, Any]]:
    """What fakellm received after its call `seq`, in order (one task runs at a time here:
    the agent's own requests and its summarisation requests)."""
    return [c for c in await mesh.fakellm_calls() if c["seq"] > seq]


async def last_seq(mesh: MeshHandle) -> int:
    calls = await mesh.fakellm_calls()
    return int(calls[-1]["seq"]) if calls else 0


async def agent_events(mesh: MeshHandle, name: str, agent: str, n: int) -> list[dict[str, Any]]:
    """The agent's `n` events `name`, once the recorder has stored them, oldest first."""

    async def stored() -> list[dict[str, Any]] | None:
        result = await query.query(
            mesh.nc,
            "SELECT payload FROM bl_messages FINAL WHERE subject = {s:String} ORDER BY ts, id",
            {"s": subjects.event("agent", name)},
        )
        found = [json.loads(p)["data"] for (p,) in result.rows]
        mine = [e for e in found if e["agent"] == agent]
        return mine if len(mine) >= n else None

    found: list[dict[str, Any]] = await wait_for(stored, timeout=20, what=f"{n} {name} recorded")
    return found


async def recorded_whole(
    mesh: MeshHandle, conversation: str, tool_results: int
) -> list[dict[str, Any]]:
    """The conversation's recorded messages (events aside), oldest first, once the recorder
    holds all of it: its tool results and its reply."""

    async def whole() -> list[dict[str, Any]] | None:
        result = await query.query(
            mesh.nc,
            "SELECT kind, payload FROM bl_messages FINAL WHERE conversation_id = {c:String} "
            "AND kind != 'event' ORDER BY ts, id",
            {"c": conversation},
        )
        history = [{"kind": k, **json.loads(p)} for k, p in result.rows]
        done = sum(h["kind"] == "tool_result" for h in history) == tool_results
        return history if done and history[-1]["kind"] == "reply" else None

    found: list[dict[str, Any]] = await wait_for(whole, timeout=20, what="recorded")
    return found


async def test_summarisation_fires_at_the_threshold_and_the_next_request_fits_the_window(
    start_mesh: MeshFactory,
) -> None:
    mesh = await context_mesh(start_mesh)
    conversation, answer = await ask(mesh, "pager", "Read the report, page by page.")
    assert answer == "done: read 6 pages"

    calls = await calls_after(mesh, 0)
    assert all(c["status"] == 200 for c in calls)
    kinds = ["summary" if is_summary(c) else "agent" for c in calls]
    # pages 1-3 fit; the request that would carry page 4 passes 80%: a summary first; the
    # same again at page 6; the answer comes with page 6 in the window
    assert kinds == ["agent"] * 4 + ["summary"] + ["agent"] * 2 + ["summary", "agent"]
    sizes = [estimate(c["body"]) for c in calls]
    agent_sizes = [s for s, k in zip(sizes, kinds, strict=True) if k == "agent"]
    assert all(s <= BUDGET for s in agent_sizes), agent_sizes
    growth = sizes[3] - sizes[2]  # what one more page adds to a request
    assert sizes[3] <= BUDGET < sizes[3] + growth  # summarised exactly when the next passes

    summarised = await agent_events(mesh, "context_summarised", "pager", 2)
    assert len(summarised) == 2
    for event, at in zip(summarised, (4, 7), strict=True):
        assert event["conversation"] == conversation
        assert (event["window"], event["threshold"]) == (WINDOW, THRESHOLD)
        # the request it shortened (the last one and a page) passed the threshold; the one
        # before it did not
        assert abs(event["tokens_before"] - (sizes[at - 1] + growth)) <= 1
        assert sizes[at - 1] <= BUDGET < event["tokens_before"]
        # and the next request fakellm received is the shortened one, under the threshold
        after = calls[at + 1]["body"]["messages"]
        assert sizes[at + 1] == event["tokens_after"] <= BUDGET
        assert after[1]["content"].startswith(SUMMARY_HEADER)
        assert after[2]["content"] == "Read the report, page by page."  # the prompt, intact
        # the latest two turns, each tool call with its result
        assert [m["role"] for m in after[3:]] == ["assistant", "tool", "assistant", "tool"]
    # the second summary absorbed the first: fakellm's first summary is in its request
    second = calls[7]["body"]["messages"][1]["content"]
    assert "Pages 1 and onwards were read" in second and "page 4 of the report" in second

    # every original message is recorded, summaries beside them, nothing replaced
    history = await recorded_whole(mesh, conversation, tool_results=6)
    assert [h["result"] for h in history if h["kind"] == "tool_result"] == [
        read_page(n) for n in range(1, 7)
    ]
    assert sum(h["kind"] == "llm_response" for h in history) == 7
    summaries = [h for h in history if h["kind"] == "summary"]
    assert len(summaries) == 2 and all(s["request_id"] and s["model"] for s in summaries)
    assert [h["kind"] for h in history][-1] == "reply"

    # each summarisation is an LLM call in the trace: a chat span with gen_ai attributes
    # (spans are written just after their batch's messages: wait for them too)
    async def summary_spans() -> list[list[Any]] | None:
        found = await query.query(
            mesh.nc,
            "SELECT SpanName, SpanAttributes['gen_ai.provider.name'] FROM otel_traces FINAL "
            "WHERE SpanAttributes['gen_ai.conversation.id'] = {c:String} "
            "AND SpanAttributes['beamline.context.summary'] = 'true'",
            {"c": conversation},
        )
        return found.rows if len(found.rows) >= 2 else None

    spans = await wait_for(summary_spans, timeout=20, what="the summaries' spans")
    assert spans == [["chat small-window", "fakellm"]] * 2


async def test_a_failed_summarisation_resets_the_window_and_the_supervisor_restarts_the_agent(
    start_mesh: MeshFactory,
) -> None:
    mesh = await context_mesh(start_mesh)
    prompts = {
        agent: f"Read the report for {agent}; it cannot be summarised."
        for agent in ("restarter", "loner")
    }
    for agent, prompt in prompts.items():
        before = await last_seq(mesh)
        conversation, answer = await ask(mesh, agent, prompt)
        assert answer == "done: read 4 pages"

        calls = await calls_after(mesh, before)
        statuses = [(is_summary(c), c["status"]) for c in calls]
        # pages 1-3; the summarisation is refused (a 400: not retried, it would be refused
        # again); the fresh window: the answer, with page 4
        assert statuses == [(False, 200)] * 4 + [(True, 400)] + [(False, 200)]
        [reset] = await agent_events(mesh, "context_window_reset", agent, 1)
        assert reset["conversation"] == conversation and reset["seed"] == "turns"
        assert reset["restart"] is (agent == "restarter")
        assert reset["tokens_before"] > BUDGET >= estimate(calls[3]["body"])
        fresh = calls[-1]["body"]
        # the fresh window: system, the seed, the task's prompt, the latest turn; it fits
        assert [m["role"] for m in fresh["messages"]] == [
            "system",
            "user",
            "user",
            "assistant",
            "tool",
        ]
        assert fresh["messages"][1]["content"].startswith(SUMMARY_HEADER)
        assert "page 3 of the report" in fresh["messages"][1]["content"]  # seed: latest turns
        assert fresh["messages"][2]["content"] == prompt
        assert fresh["messages"][4]["content"] == read_page(4)
        assert estimate(fresh) == reset["tokens_after"] <= BUDGET

        history = await recorded_whole(mesh, conversation, tool_results=4)
        [seed] = [h for h in history if h["kind"] == "summary"]
        assert seed["fresh_window"] and "request_id" not in seed

    # the supervised agent's incarnation ended with context_overflow and was restarted
    evs = await events(mesh)
    [exited] = named(evs, "child_exited", "restarter")
    assert exited["exit"] == "context_overflow"
    [restarted] = named(evs, "child_restarted", "restarter")
    assert restarted["exit"] == "context_overflow" and restarted["reason"] == "permanent"
    assert not named(evs, "child_exited", "pager")
