"""Loop detection, pure: one conversation's journal entries in, a `Loop` out when they
repeat. No I/O and no clock: the service feeds entries in stream order, and a conversation
rebuilt from its journal (after a restart, or evicted from memory) reaches the same state.

Two kinds of loop:
- the same tool with the same arguments (canonical JSON: key order and spacing do not
  matter) called `same_tool_calls` times, counted from the tool results journaled;
- `similar_outputs` LLM outputs in a row each nearly identical to the one before (difflib
  ratio >= `similarity`). Outputs shorter than `min_output_chars` are skipped (neither
  counted nor breaking a run): "ok" to many tasks is no loop, and a tool-call-only
  response between two long answers does not hide their repetition.

A loop is reported once, on its Nth repeat; the counts then start afresh, so a loop that
goes on is reported again after N more repeats. With `scope: task` the counts also start
afresh with every task of the conversation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from difflib import SequenceMatcher

from beamline.envelope import Envelope, Kind, LLMResponsePayload, TaskPayload, ToolResultPayload
from beamline.guard import QUOTE_CHARS, Loop, LoopGuard, LoopKind, Scope

# Outputs are compared on their beginning: a ratio costs up to quadratic time in the length,
# and two answers that agree on their first 2,000 characters are a repeat.
COMPARED_CHARS = 2000


@dataclass
class Watch:
    """What one agent's conversation has repeated so far."""

    calls: dict[str, int] = field(default_factory=dict)  # tool signature -> times called
    last_output: str | None = None
    run: int = 0  # similar outputs in a row, the last one included
    seen: set[str] = field(default_factory=set)  # entry ids counted (redeliveries count once)

    def restart_counts(self) -> None:
        self.calls.clear()
        self.last_output, self.run = None, 0


def counted(guard: LoopGuard, kind: str | None) -> bool:
    """Whether an entry of `kind` (its Bl-Kind header; None when it has none) can change a
    watch under `guard`: the service skips the others without decoding them, and most
    entries of a conversation (requests, replies, summaries) are such."""
    if kind is None:
        return True
    if kind == Kind.TASK:
        return guard.scope is Scope.TASK
    if kind == Kind.TOOL_RESULT:
        return bool(guard.same_tool_calls)
    return kind == Kind.LLM_RESPONSE and bool(guard.similar_outputs)


def observe(guard: LoopGuard, watch: Watch, entry: Envelope) -> Loop | None:
    """Count `entry` into `watch`; the loop it completes, if any."""
    if entry.id in watch.seen:
        return None
    payload = entry.payload
    if isinstance(payload, TaskPayload):
        watch.seen.add(entry.id)
        if guard.scope is Scope.TASK:
            watch.restart_counts()
        return None
    if isinstance(payload, ToolResultPayload) and guard.same_tool_calls:
        watch.seen.add(entry.id)
        return _tool_call(guard, watch, payload)
    if isinstance(payload, LLMResponsePayload) and guard.similar_outputs:
        watch.seen.add(entry.id)
        return _output(guard, watch, (payload.message.content or "").strip())
    return None


def _tool_call(guard: LoopGuard, watch: Watch, result: ToolResultPayload) -> Loop | None:
    arguments = canonical_arguments(result.arguments)
    key = f"{result.name}\x00{arguments}"
    count = watch.calls[key] = watch.calls.get(key, 0) + 1
    if count < guard.same_tool_calls:
        return None
    watch.restart_counts()
    return Loop(kind=LoopKind.SAME_TOOL_CALL, count=count, tool=result.name, arguments=arguments)


def _output(guard: LoopGuard, watch: Watch, text: str) -> Loop | None:
    if len(text) < guard.min_output_chars:
        return None
    text = text[:COMPARED_CHARS]
    repeated = watch.last_output is not None and similar(watch.last_output, text, guard.similarity)
    watch.run = watch.run + 1 if repeated else 1
    watch.last_output = text
    if watch.run < guard.similar_outputs:
        return None
    count = watch.run
    watch.restart_counts()
    return Loop(kind=LoopKind.SIMILAR_OUTPUT, count=count, text=text[:QUOTE_CHARS])


def canonical_arguments(arguments: str) -> str:
    """Tool arguments as canonical JSON (sorted keys, no spacing); text that is not JSON
    (a model's malformed call) stands for itself, stripped."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return arguments.strip()
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def similar(a: str, b: str, threshold: float) -> bool:
    """difflib's ratio >= threshold; its cheap upper bounds rule most pairs out first."""
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    return (
        matcher.real_quick_ratio() >= threshold
        and matcher.quick_ratio() >= threshold
        and matcher.ratio() >= threshold
    )
