"""What an agent does next, decided from its journal alone (pure: no I/O).

A conversation's journal is the ordered list of envelopes the agent persisted: the task as
received, each LLM response, each tool result, and the final reply or error. Because the
next action is a function of the journal, an agent respawned after a crash continues exactly
where the journal ends: completed LLM and tool calls are never repeated.

Context pressure: given the `Limits` of the model its call is routed to, an LLM call whose
request is estimated above `context.threshold` x that window is preceded by a summary
(`Summarise`: one LLM call of its own, whose result is journaled as a `summary` entry) or,
when a summary cannot help, by a fresh window (`ResetWindow`); see window.py for what each
keeps. Summaries are not steps: `max_steps` counts the task's own LLM calls.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from beamline.budget import estimate_tokens
from beamline.config import AgentSpec
from beamline.envelope import (
    ChatMessage,
    Envelope,
    ErrorPayload,
    LLMResponsePayload,
    ReplyPayload,
    SummaryPayload,
    TaskPayload,
    ToolCall,
    ToolResultPayload,
)
from beamline.errors import Reason
from beamline.ids import derived_id
from services.agent import window
from services.agent.window import Limits

# A fresh window's seed takes at most this share of the room left under the threshold, so
# the agent has room to work before its window fills again.
SEED_SHARE = 0.5


@dataclass(frozen=True)
class CallLLM:
    request_id: str  # deterministic: the gateway de-duplicates a repeated request on it
    index: int  # how many LLM calls this task has completed before this one


@dataclass(frozen=True)
class RunTools:
    calls: tuple[ToolCall, ...]
    after: Envelope  # the LLM response that asked for them


@dataclass(frozen=True)
class Reply:
    text: str


@dataclass(frozen=True)
class Fail:
    reason: Reason
    message: str


@dataclass(frozen=True)
class Done:
    outcome: Envelope  # the reply or error already journaled


@dataclass(frozen=True)
class Summarise:
    """Summarise the older turns with one LLM call before the next call (window.py)."""

    request_id: str  # deterministic, like CallLLM's: a respawn does not pay for it twice
    entry_id: str  # the id its `summary` entry is journaled with
    cut: window.Cut
    messages: tuple[ChatMessage, ...]  # the summarisation request
    max_tokens: int
    tokens_before: int  # the estimate of the request it shortens
    limits: Limits


@dataclass(frozen=True)
class ResetWindow:
    """Journal `summary` (a fresh window's seed); a supervised agent's incarnation then
    ends (`context_overflow`) and the next one starts from the fresh window."""

    entry_id: str
    summary: SummaryPayload
    from_summary: bool  # seeded from the latest summary (else from the latest turns alone)


Action = CallLLM | RunTools | Reply | Fail | Done | Summarise | ResetWindow


def task_entries(journal: Sequence[Envelope], task_id: str) -> Sequence[Envelope] | None:
    """The entries written while handling `task_id` (the task first), or None if not seen."""
    for i, env in enumerate(journal):
        if env.id == task_id:
            end = i + 1
            while end < len(journal) and not isinstance(journal[end].payload, TaskPayload):
                end += 1
            return journal[i:end]
    return None


def next_action(
    spec: AgentSpec,
    journal: Sequence[Envelope],
    task_id: str,
    agent: str | None = None,
    limits: Limits | None = None,
) -> Action:
    """The next step. With `limits` (the routed model's window), an LLM call that would not
    fit under the threshold becomes a `Summarise`, a `ResetWindow` or a `Fail` first."""
    entries = task_entries(journal, task_id)
    if not entries:
        raise ValueError(f"task {task_id} is not in the journal; journal it first")
    last = next(e for e in reversed(entries) if not window.is_marker(e))
    if isinstance(last.payload, ReplyPayload | ErrorPayload):
        return Done(last)
    llm_calls = sum(isinstance(e.payload, LLMResponsePayload) for e in entries)
    if isinstance(last.payload, LLMResponsePayload):
        message = last.payload.message
        if message.tool_calls:
            return RunTools(message.tool_calls, after=last)
        return _final(spec, message.content or "", agent or spec.name)
    if isinstance(last.payload, ToolResultPayload):
        pending = _pending_calls(entries)
        if pending:
            return RunTools(pending[0], after=pending[1])
    if llm_calls >= spec.max_steps:
        return Fail(Reason.MAX_STEPS, f"no final answer after {llm_calls} LLM calls (max_steps)")
    agent = agent or spec.name
    if limits is not None:
        shorten = _within_window(spec, journal, entries, agent, limits)
        if shorten is not None:
            return shorten
    return CallLLM(derived_id("llm", agent, task_id, str(llm_calls)), llm_calls)


def _pending_calls(entries: Sequence[Envelope]) -> tuple[tuple[ToolCall, ...], Envelope] | None:
    """Tool calls of the latest LLM response that have no journaled result yet."""
    for i in range(len(entries) - 1, -1, -1):
        payload = entries[i].payload
        if isinstance(payload, LLMResponsePayload):
            done = {
                e.payload.call_id
                for e in entries[i + 1 :]
                if isinstance(e.payload, ToolResultPayload)
            }
            pending = tuple(c for c in payload.message.tool_calls if c.id not in done)
            return (pending, entries[i]) if pending else None
    return None


def _final(spec: AgentSpec, text: str, agent: str) -> Reply | Fail:
    if spec.output == "json":
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return Fail(
                Reason.INVALID_LLM_OUTPUT,
                f"agent {agent} must answer JSON; the model answered: {text[:200]!r}",
            )
    return Reply(text)


def chat_messages(spec: AgentSpec, journal: Sequence[Envelope]) -> tuple[ChatMessage, ...]:
    """The whole conversation as the LLM sees it: system prompt, then every journaled turn."""
    messages = [ChatMessage(role="system", content=spec.system_prompt)]
    for env in window.visible(journal):  # a summary stands in for the older turns
        p = env.payload
        if isinstance(p, TaskPayload):
            messages.append(ChatMessage(role="user", content=p.prompt))
        elif isinstance(p, LLMResponsePayload):
            messages.append(p.message)
        elif isinstance(p, ToolResultPayload):
            content = (
                p.result if p.error_reason is None else f"error ({p.error_reason}): {p.result}"
            )
            messages.append(ChatMessage(role="tool", content=content, tool_call_id=p.call_id))
        elif isinstance(p, SummaryPayload):  # stands in for the entries it covers
            messages.append(window.summary_message(p))
    return tuple(messages)


# --- context pressure ---------------------------------------------------------------------


def request_tokens(spec: AgentSpec, journal: Sequence[Envelope], limits: Limits) -> int:
    """The estimate of the next LLM request: its messages and tools, and `max_tokens` of
    room for the answer (a provider counts both against the window)."""
    return estimate_tokens(chat_messages(spec, journal), limits.tools) + spec.max_tokens


def _within_window(
    spec: AgentSpec,
    journal: Sequence[Envelope],
    entries: Sequence[Envelope],
    agent: str,
    limits: Limits,
) -> Summarise | ResetWindow | Fail | None:
    """None when the next request fits under the threshold; else how to make it fit."""
    tokens = request_tokens(spec, journal, limits)
    budget = limits.budget(spec.context.threshold)
    if tokens <= budget:
        return None
    task = entries[0]
    fresh = reset_window(spec, journal, task.id, agent, limits, tokens)
    if isinstance(fresh, Fail):  # not even the latest turn fits: no summary can help
        return fresh
    latest = window.latest_summary(journal)
    if latest is not None and journal[-1].id == latest.id:
        # shortened just now, and still too full
        assert isinstance(latest.payload, SummaryPayload)
        if latest.payload.fresh_window:
            return Fail(Reason.CONTEXT_OVERFLOW, _overflow(spec, tokens, limits, "fresh window"))
        return fresh
    cut = window.plan_summary(journal, spec.context.keep_turns)
    if cut is None:
        return fresh
    probe = window.summary_request(cut, 0)
    room = budget - estimate_tokens(probe) - spec.max_tokens
    if room <= 0:  # not even the summariser's request fits this window
        return fresh
    index = str(_shortened(entries))
    request_id = derived_id("summary", agent, task.id, index)
    return Summarise(
        request_id=request_id,
        entry_id=derived_id("summary_entry", request_id),
        cut=cut,
        messages=window.summary_request(cut, window.chars_for(room)),
        max_tokens=spec.max_tokens,
        tokens_before=tokens,
        limits=limits,
    )


def summarised(
    spec: AgentSpec,
    journal: Sequence[Envelope],
    action: Summarise,
    response: LLMResponsePayload,
) -> SummaryPayload | None:
    """The `summary` entry's payload for the summarisation call's answer; None when the
    model answered no text (it cannot stand in for anything)."""
    text = (response.message.content or "").strip()
    if not text:
        return None
    summary = SummaryPayload(
        text=text,
        through=action.cut.through,
        tokens_before=action.tokens_before,
        tokens_after=0,
        window=action.limits.window,
        threshold=spec.context.threshold,
        request_id=response.request_id,
        provider=response.provider,
        model=response.model,
        finish_reason=response.finish_reason,
        latency_ms=response.latency_ms,
        attempts=response.attempts,
    )
    return _with_tokens_after(spec, journal, summary, action.limits)


def reset_window(
    spec: AgentSpec,
    journal: Sequence[Envelope],
    task_id: str,
    agent: str,
    limits: Limits,
    tokens_before: int,
) -> ResetWindow | Fail:
    """A fresh window: system, a seed, the current task's prompt and the latest turn. The
    seed is the latest summary, then as much of the turns since as fits, as text (no LLM
    call: this is what is left when summarising failed). Fail when even that cannot fit."""
    entries = task_entries(journal, task_id)
    assert entries
    cut = window.plan_fresh(journal)
    if cut is None:
        return Fail(Reason.CONTEXT_OVERFLOW, _overflow(spec, tokens_before, limits, "latest turn"))
    budget = limits.budget(spec.context.threshold)
    bare = SummaryPayload(
        text="",
        through=cut.through,
        tokens_before=tokens_before,
        tokens_after=0,
        window=limits.window,
        threshold=spec.context.threshold,
        fresh_window=True,
    )
    least = request_tokens(spec, [*journal, _entry(entries[0], bare)], limits)
    if least > budget:
        return Fail(Reason.CONTEXT_OVERFLOW, _overflow(spec, least, limits, "fresh window"))
    turns = [t for t in cut.covered if t.first_id != entries[0].id]  # its prompt is kept
    room = window.chars_for(int((budget - least) * SEED_SHARE))
    seed = window.fit_text(cut.previous, turns, room) or "(nothing earlier fits this window)"
    summary = _with_tokens_after(spec, journal, bare.model_copy(update={"text": seed}), limits)
    index = str(_shortened(entries))
    return ResetWindow(
        entry_id=derived_id("fresh_window", agent, task_id, index),
        summary=summary,
        from_summary=cut.previous is not None,
    )


def _with_tokens_after(
    spec: AgentSpec, journal: Sequence[Envelope], summary: SummaryPayload, limits: Limits
) -> SummaryPayload:
    task = window.current_task(journal)
    assert task is not None
    after = request_tokens(spec, [*journal, _entry(task, summary)], limits)
    return summary.model_copy(update={"tokens_after": after})


def _entry(task: Envelope, summary: SummaryPayload) -> Envelope:
    """A stand-in journal entry for estimating a window with `summary` in force."""
    return task.child(summary, sender="estimate", recipient="estimate")


def _shortened(entries: Sequence[Envelope]) -> int:
    """How often this task's window was shortened: numbers the next summary's ids."""
    return sum(window.is_marker(e) for e in entries)


def _overflow(spec: AgentSpec, tokens: int, limits: Limits, what: str) -> str:
    budget = limits.budget(spec.context.threshold)
    return (
        f"the conversation does not fit the model's context window even as a {what}: "
        f"{tokens} tokens estimated (max_tokens {spec.max_tokens} included), over "
        f"{budget} ({spec.context.threshold:g} x {limits.window}): raise the model's "
        "context_window or context.threshold, lower max_tokens, or shorten the task's "
        "prompt or its tools' outputs"
    )
