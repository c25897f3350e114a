"""Context pressure, pure: when an agent's next request passes the threshold of its model's
window it is summarised (keeping the latest turns, never splitting a tool call from its
result), summarised again as it grows, reset to a fresh window when a summary cannot help,
and failed when not even a fresh window fits."""

from __future__ import annotations

from typing import Any, cast

import pytest

from beamline.budget import estimate_tokens
from beamline.config import AgentSpec, ContextPolicy, ModelChoice
from beamline.envelope import (
    ChatMessage,
    Envelope,
    Kind,
    LLMResponsePayload,
    SummaryPayload,
    TaskPayload,
    ToolCall,
    ToolResultPayload,
)
from beamline.errors import Reason
from beamline.guard import Addendum
from services.agent import conversation as conv
from services.agent import window
from services.agent.runner import Agent
from services.agent.window import Limits

SPEC = AgentSpec(
    name="reader",
    role="r",
    system_prompt="You read pages.",
    models=(ModelChoice(provider="p", model="m", context_window=1500),),
    max_tokens=100,
    max_steps=50,
    context=ContextPolicy(threshold=0.8, keep_turns=2),
)
LIMITS = Limits(window=1500)  # 1,200 tokens under the threshold
PAGE = 1200  # characters of a tool result: 300 tokens


def task(prompt: str = "Read every page.", id: str = "t1") -> Envelope:
    return Envelope(
        id=id,
        kind=Kind.TASK,
        sender="cli",
        recipient="reader",
        conversation_id="c",
        payload=TaskPayload(prompt=prompt),
    )


TASK = task()


def asks(*pages: int) -> Envelope:
    calls = tuple(
        ToolCall(id=f"call-{n}", name="read_page", arguments=f'{{"n": {n}}}') for n in pages
    )
    message = ChatMessage(role="assistant", tool_calls=calls)
    return TASK.child(
        LLMResponsePayload(request_id="r", provider="p", model="m", message=message),
        id=f"ask-{'-'.join(map(str, pages))}",
        sender="gateway",
        recipient="reader",
    )


def page(n: int, size: int = PAGE) -> Envelope:
    text = f"page {n}: " + "x" * (size - 8)
    return TASK.child(
        ToolResultPayload(call_id=f"call-{n}", name="read_page", result=text),
        id=f"page-{n}",
        sender="tool.read_page",
        recipient="reader",
    )


def reading(pages: int, start: int = 1) -> list[Envelope]:
    """One turn per page: the call, then its result."""
    out: list[Envelope] = []
    for n in range(start, start + pages):
        out += [asks(n), page(n)]
    return out


def tokens(journal: list[Envelope]) -> int:
    return conv.request_tokens(SPEC, journal, LIMITS)


def journaled(journal: list[Envelope], summary: SummaryPayload, id: str = "sum") -> list[Envelope]:
    return [*journal, TASK.child(summary, id=id, sender="gateway", recipient="reader")]


def test_below_the_threshold_the_call_goes_ahead_and_above_it_a_summary_comes_first() -> None:
    three = [TASK, *reading(3)]
    assert tokens(three) <= 1200 < tokens([*three, *reading(1, start=4)])
    assert isinstance(conv.next_action(SPEC, three, TASK.id, limits=LIMITS), conv.CallLLM)

    four = [TASK, *reading(4)]
    action = conv.next_action(SPEC, four, TASK.id, limits=LIMITS)
    assert isinstance(action, conv.Summarise)
    assert action.tokens_before == tokens(four) > 1200
    # deterministic, like every LLM call: a respawned agent asks the gateway the same id
    assert conv.next_action(SPEC, four, TASK.id, limits=LIMITS) == action
    # no window known: no context pressure (as before)
    assert isinstance(conv.next_action(SPEC, four, TASK.id), conv.CallLLM)


def test_the_summary_keeps_the_latest_turns_and_the_task_prompt_as_they_are() -> None:
    journal = [TASK, *reading(4)]
    journal_ids = [e.id for e in journal]
    action = conv.next_action(SPEC, journal, TASK.id, limits=LIMITS)
    assert isinstance(action, conv.Summarise)
    # the task and pages 1-2 are summarised; pages 3-4 (keep_turns: 2) stay
    assert action.cut.through == "page-2" and action.cut.previous is None
    assert [t.first_id for t in action.cut.covered] == [TASK.id, "ask-1", "ask-2"]
    request = action.messages[1].content or ""
    assert action.messages[0].content == window.SUMMARISER_SYSTEM
    assert "user: Read every page." in request and "page 2: xxx" in request
    assert "page 3" not in request

    summary = conv.summarised(SPEC, journal, action, _answer(action, "pages 1-2 read"))
    assert summary is not None and summary.tokens_before == action.tokens_before
    after = journaled(journal, summary)
    messages = conv.chat_messages(SPEC, after)
    assert [m.role for m in messages] == [
        "system",
        "user",
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
    ]
    assert messages[1].content == f"{window.SUMMARY_HEADER}\n\npages 1-2 read"
    assert messages[2].content == "Read every page."  # the prompt, intact
    assert [m.tool_call_id for m in messages if m.role == "tool"] == ["call-3", "call-4"]
    assert summary.tokens_after == tokens(after) <= 1200
    # the journal keeps every entry, those the summary stands for included: only what is
    # sent changed (pages 1-2 are journaled, and no longer in the messages)
    assert [e.id for e in after[: len(journal)]] == journal_ids
    assert summary.through == "page-2" and "page-2" in journal_ids
    assert not any("page 2: xxx" in (m.content or "") for m in messages)


def test_a_tool_call_is_never_split_from_its_results() -> None:
    # one assistant message asking for two pages, answered by two results: one turn
    journal = [TASK, *reading(2), asks(3, 4), page(3, 600), page(4, 600), *reading(1, start=5)]
    assert [len(t.entries) for t in window.turns(journal)] == [1, 2, 2, 3, 2]
    action = conv.next_action(SPEC, journal, TASK.id, limits=LIMITS)
    assert isinstance(action, conv.Summarise)
    assert action.cut.through == "page-2"  # the cut falls before the pair, not inside it
    summary = conv.summarised(SPEC, journal, action, _answer(action))
    assert summary is not None
    messages = conv.chat_messages(SPEC, journaled(journal, summary))
    roles = [m.role for m in messages]
    assert roles[3:] == ["assistant", "tool", "tool", "assistant", "tool"]
    assert {c.id for c in messages[3].tool_calls} == {"call-3", "call-4"}


def test_a_long_conversation_is_summarised_again_summary_and_newer_turns_together() -> None:
    journal = [TASK, *reading(4)]
    first = conv.next_action(SPEC, journal, TASK.id, limits=LIMITS)
    assert isinstance(first, conv.Summarise)
    summary = conv.summarised(SPEC, journal, first, _answer(first, "FIRST SUMMARY"))
    assert summary is not None
    journal = journaled(journal, summary, id="sum-1")
    assert isinstance(conv.next_action(SPEC, journal, TASK.id, limits=LIMITS), conv.CallLLM)
    journal += reading(2, start=5)
    second = conv.next_action(SPEC, journal, TASK.id, limits=LIMITS)
    assert isinstance(second, conv.Summarise)
    assert second.request_id != first.request_id and second.entry_id != first.entry_id
    # the new summary absorbs the first one and the turns since it, up to the kept two
    assert second.cut.previous == "FIRST SUMMARY" and second.cut.through == "page-4"
    assert "FIRST SUMMARY" in (second.messages[1].content or "")
    resummary = conv.summarised(SPEC, journal, second, _answer(second, "SECOND SUMMARY"))
    assert resummary is not None
    messages = conv.chat_messages(SPEC, journaled(journal, resummary, id="sum-2"))
    assert "SECOND SUMMARY" in (messages[1].content or "")
    assert not any("FIRST SUMMARY" in (m.content or "") for m in messages)
    assert [m.tool_call_id for m in messages if m.role == "tool"] == ["call-5", "call-6"]


def test_summaries_are_not_steps_max_steps_counts_the_tasks_own_calls() -> None:
    spec = SPEC.model_copy(update={"max_steps": 5})
    journal = [TASK, *reading(4)]
    action = conv.next_action(spec, journal, TASK.id, limits=LIMITS)
    assert isinstance(action, conv.Summarise)
    summary = conv.summarised(spec, journal, action, _answer(action))
    assert summary is not None
    after = journaled(journal, summary)
    # the fifth call, with the id it has without any summary
    unshortened = conv.next_action(spec, journal, TASK.id)
    assert isinstance(unshortened, conv.CallLLM) and unshortened.index == 4
    assert conv.next_action(spec, after, TASK.id, limits=LIMITS) == unshortened
    spent = [*after, *reading(1, start=5)]
    action = conv.next_action(spec, spent, TASK.id, limits=LIMITS)
    assert isinstance(action, conv.Fail) and action.reason is Reason.MAX_STEPS


def test_still_too_full_after_a_summary_gives_a_fresh_window_seeded_from_it() -> None:
    journal = [TASK, *reading(4)]
    action = conv.next_action(SPEC, journal, TASK.id, limits=LIMITS)
    assert isinstance(action, conv.Summarise)
    verbose = conv.summarised(SPEC, journal, action, _answer(action, "s" * 4000))
    assert verbose is not None and verbose.tokens_after > 1200
    journal = journaled(journal, verbose)
    reset = conv.next_action(SPEC, journal, TASK.id, limits=LIMITS)
    assert isinstance(reset, conv.ResetWindow) and reset.from_summary
    fresh = reset.summary
    assert fresh.fresh_window and fresh.request_id is None
    assert fresh.through == "page-3" and fresh.text.startswith("(summary of what came before)")
    assert fresh.tokens_before == tokens(journal) and fresh.tokens_after <= 1200
    # the fresh window: system, seed, the task's prompt, the latest turn
    after = journaled(journal, fresh, id="fresh")
    messages = conv.chat_messages(SPEC, after)
    assert [m.role for m in messages] == ["system", "user", "user", "assistant", "tool"]
    assert messages[2].content == "Read every page." and messages[4].tool_call_id == "call-4"
    assert fresh.tokens_after == tokens(after)
    assert isinstance(conv.next_action(SPEC, after, TASK.id, limits=LIMITS), conv.CallLLM)


def test_with_no_summary_the_seed_is_as_much_of_the_latest_turns_as_fits() -> None:
    journal = [TASK, *reading(4)]
    reset = conv.reset_window(SPEC, journal, TASK.id, "reader", LIMITS, tokens(journal))
    assert isinstance(reset, conv.ResetWindow) and not reset.from_summary
    seed = reset.summary.text
    assert seed.startswith("[") and "earlier turns left out" in seed
    assert "page 3: " in seed and "page 1" not in seed  # the newest first
    assert "user: Read every page." not in seed  # the prompt is in the window anyway
    assert reset.summary.tokens_after <= 1200
    # its seed took at most half the room the latest turn left
    least = reset.summary.model_copy(update={"text": ""})
    room = 1200 - tokens(journaled(journal, least))
    assert estimate_tokens([ChatMessage(role="user", content=seed)]) <= room // 2 + 4


def test_a_fresh_window_that_cannot_fit_fails_the_task_instead_of_looping() -> None:
    huge = [TASK, *reading(2), asks(3), page(3, 5000)]  # one result alone passes the window
    action = conv.next_action(SPEC, huge, TASK.id, limits=LIMITS)
    assert isinstance(action, conv.Fail) and action.reason is Reason.CONTEXT_OVERFLOW
    assert "fresh window" in action.message and "context_window" in action.message
    # a single turn with nothing to leave out: the same
    alone = [task("y" * 6000)]
    action = conv.next_action(SPEC, alone, TASK.id, limits=LIMITS)
    assert isinstance(action, conv.Fail) and action.reason is Reason.CONTEXT_OVERFLOW
    # a fresh window that no longer fits (a smaller model now) fails too, not resets again
    journal = [TASK, *reading(4)]
    reset = conv.reset_window(SPEC, journal, TASK.id, "reader", LIMITS, tokens(journal))
    assert isinstance(reset, conv.ResetWindow)
    after = journaled(journal, reset.summary, id="fresh")
    action = conv.next_action(SPEC, after, TASK.id, limits=Limits(window=900))
    assert isinstance(action, conv.Fail) and action.reason is Reason.CONTEXT_OVERFLOW


def test_a_summarisation_that_answers_nothing_cannot_stand_in() -> None:
    journal = [TASK, *reading(4)]
    action = conv.next_action(SPEC, journal, TASK.id, limits=LIMITS)
    assert isinstance(action, conv.Summarise)
    assert conv.summarised(SPEC, journal, action, _answer(action, "  ")) is None


def test_only_earlier_turns_of_other_tasks_are_summarised_with_the_prompt_kept() -> None:
    first = [TASK, *reading(3)]
    second = task("Now summarise page 3.", id="t2")
    journal = [*first, second, *reading(2, start=10)]
    action = conv.next_action(SPEC, journal, "t2", limits=LIMITS)
    assert isinstance(action, conv.Summarise)
    assert action.cut.through == "t2"  # the first task's turns, and the new prompt (kept)
    summary = conv.summarised(SPEC, journal, action, _answer(action))
    assert summary is not None
    messages = conv.chat_messages(SPEC, journaled(journal, summary))
    prompts = [m.content for m in messages if m.role == "user"][1:]
    assert prompts == ["Now summarise page 3."]  # the current task's, not the first's


@pytest.mark.parametrize("keep", [1, 3])
def test_keep_turns_sets_how_many_latest_turns_stay(keep: int) -> None:
    spec = SPEC.model_copy(update={"context": ContextPolicy(threshold=0.8, keep_turns=keep)})
    journal = [TASK, *reading(4)]
    action = conv.next_action(spec, journal, TASK.id, limits=LIMITS)
    assert isinstance(action, conv.Summarise)
    assert action.cut.through == f"page-{4 - keep}"


def _answer(action: conv.Summarise, text: str = "pages so far") -> LLMResponsePayload:
    return LLMResponsePayload(
        request_id=action.request_id,
        provider="p",
        model="m",
        message=ChatMessage(role="assistant", content=text),
    )


def test_the_loop_guards_addendum_counts_in_the_window_the_agent_plans_for() -> None:
    """The addendum joins the system prompt the model gets; the decision to summarise must
    see it too. When they disagreed, a call the addendum tipped over the window was never
    sent and never planned for: the host's event loop spun on that step forever."""
    agent = Agent(SPEC, cast(Any, None))
    journal = [TASK, *reading(3)]
    budget = LIMITS.budget(SPEC.context.threshold)
    room = budget - conv.request_tokens(SPEC, journal, LIMITS)
    assert room > 0  # without the addendum the call fits
    assert isinstance(conv.next_action(SPEC, journal, TASK.id, "reader", LIMITS), conv.CallLLM)

    agent.addendum = Addendum(conversation_id="c", text="Loop guard: " + "y" * (room * 4 + 40))
    spec = agent._spec_for("c")
    assert spec.system_prompt.endswith(agent.addendum.text)
    assert conv.request_tokens(spec, journal, LIMITS) > budget
    planned = conv.next_action(spec, journal, TASK.id, "reader", LIMITS)
    assert isinstance(planned, conv.Summarise | conv.ResetWindow)
    # another conversation's spec is the agent's own
    assert agent._spec_for("other") is SPEC
