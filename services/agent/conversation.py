"""What an agent does next, decided from its journal alone (pure: no I/O).

A conversation's journal is the ordered list of envelopes the agent persisted: the task as
received, each LLM response, each tool result, and the final reply or error. Because the
next action is a function of the journal, an agent respawned after a crash continues exactly
where the journal ends: completed LLM and tool calls are never repeated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from beamline.config import AgentSpec
from beamline.envelope import (
    ChatMessage,
    Envelope,
    ErrorPayload,
    LLMResponsePayload,
    ReplyPayload,
    TaskPayload,
    ToolCall,
    ToolResultPayload,
)
from beamline.errors import Reason
from beamline.ids import derived_id


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


Action = CallLLM | RunTools | Reply | Fail | Done


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
    spec: AgentSpec, journal: Sequence[Envelope], task_id: str, agent: str | None = None
) -> Action:
    entries = task_entries(journal, task_id)
    if not entries:
        raise ValueError(f"task {task_id} is not in the journal; journal it first")
    last = entries[-1]
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
    return CallLLM(derived_id("llm", agent or spec.name, task_id, str(llm_calls)), llm_calls)


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
    for env in journal:
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
    return tuple(messages)
