"""An agent's context window: which journal entries the LLM sees, and what to shorten (pure).

A conversation's journal grows without bound; a model's context window does not. Once a
`summary` entry is journaled it stands in for every entry up to the one it names
(`through`): the LLM then sees the summary, the current task's prompt (always, as written)
and every entry after `through`. The journal, and ClickHouse, keep every entry: only what
is sent changes. `conversation.py` decides when (the threshold); this module says what.

Turns are what the LLM must see together, so a window is only ever cut between two turns:
a task's prompt; an answer; an assistant message that asks for tools together with the
results of those calls (a provider refuses a tool result without its call, and the reverse).

Two ways to shorten, both cut at a turn boundary:

- a summary: the older turns (and the previous summary, which it absorbs) are summarised
  by an LLM call; the latest `keep_turns` turns stay as they are.
- a fresh window, when summarising failed or did not bring the request under the
  threshold: only the latest turn stays; a seed stands for the rest, made without an LLM
  call from the latest summary and as much of the turns since as fits, as text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from beamline.budget import CHARS_PER_TOKEN
from beamline.envelope import (
    ChatMessage,
    Envelope,
    LLMResponsePayload,
    SummaryPayload,
    TaskPayload,
    ToolResultPayload,
    ToolSpec,
)

# The summary's opening line in the window: says what the message is, so the model takes
# it as its own notes and not as a new request.
SUMMARY_HEADER = (
    "[Earlier in this conversation, summarised; the full history is kept. Continue the "
    "current task from here.]"
)
SUMMARISER_SYSTEM = (
    "You write the working memory of an AI agent whose conversation no longer fits its "
    "context window. The agent will continue from your summary alone."
)
SUMMARISER_INSTRUCTION = (
    "Summarise the conversation below for the agent. Keep its reasoning chain: what each "
    "request asked and its constraints, what was tried, what tools returned that matters "
    "(facts, names, numbers, exact values), what was decided and why, and what remains to "
    "do. Leave out repetition and pleasantries. Answer with the summary only."
)
OMITTED = "[{n} earlier turns left out: they did not fit]"
CLIPPED = " …[clipped]"
# A turn clipped to less than this is noise, not context: it is left out instead.
MIN_CLIP_CHARS = 200


@dataclass(frozen=True)
class Limits:
    """What an LLM request must fit: the context window of the model the call is routed to
    (tokens, input + output), and the tools the request offers (their specs count too)."""

    window: int
    tools: tuple[ToolSpec, ...] = ()

    def budget(self, threshold: float) -> int:
        """The most tokens a request may be estimated at: threshold x window."""
        return int(self.window * threshold)


@dataclass(frozen=True)
class Turn:
    entries: tuple[Envelope, ...]

    @property
    def last_id(self) -> str:
        return self.entries[-1].id

    @property
    def first_id(self) -> str:
        return self.entries[0].id


@dataclass(frozen=True)
class Cut:
    """Where a window is cut: the new summary or seed stands for the journal up to
    `through`: the previous summary's text (if any) and the `covered` turns since it."""

    through: str
    previous: str | None
    covered: tuple[Turn, ...]


def is_marker(env: Envelope) -> bool:
    return isinstance(env.payload, SummaryPayload)


def latest_summary(journal: Sequence[Envelope]) -> Envelope | None:
    """The summary (or fresh window) in force: the latest journaled."""
    return next((e for e in reversed(journal) if is_marker(e)), None)


def current_task(journal: Sequence[Envelope]) -> Envelope | None:
    """The task being handled: an agent handles a conversation's tasks one at a time and
    journals each as it starts on it, so the latest one."""
    return next((e for e in reversed(journal) if isinstance(e.payload, TaskPayload)), None)


def unsummarised(journal: Sequence[Envelope]) -> tuple[SummaryPayload | None, list[Envelope]]:
    """The summary in force (None: none yet) and the entries it does not cover, in order."""
    marker = latest_summary(journal)
    if marker is None:
        return None, [e for e in journal if not is_marker(e)]
    summary = marker.payload
    assert isinstance(summary, SummaryPayload)
    cut = _index(journal, summary.through)
    if cut is None:  # names no entry of this journal: it cannot stand for anything
        return None, [e for e in journal if not is_marker(e)]
    return summary, [e for e in journal[cut + 1 :] if not is_marker(e)]


def visible(journal: Sequence[Envelope]) -> list[Envelope]:
    """The entries the LLM sees, in the order it sees them: every entry; or, once a summary
    is in force, the summary, the current task (if the summary covers it: the prompt is
    kept as written) and every entry after the last one the summary covers."""
    summary, rest = unsummarised(journal)
    if summary is None:
        return rest
    marker = latest_summary(journal)
    assert marker is not None
    head = [marker]
    task = current_task(journal)
    if task is not None and all(e.id != task.id for e in rest):
        head.append(task)
    return head + rest


def summary_message(summary: SummaryPayload) -> ChatMessage:
    return ChatMessage(role="user", content=f"{SUMMARY_HEADER}\n\n{summary.text}")


def turns(entries: Iterable[Envelope]) -> list[Turn]:
    """Entries grouped into turns; replies, errors and summaries give the LLM no message
    of their own and are left out. A tool result joins the turn before it: the one whose
    assistant message asked for it."""
    grouped: list[list[Envelope]] = []
    for env in entries:
        payload = env.payload
        if isinstance(payload, TaskPayload | LLMResponsePayload):
            grouped.append([env])
        elif isinstance(payload, ToolResultPayload):
            if grouped:
                grouped[-1].append(env)
            else:
                grouped.append([env])
    return [Turn(tuple(t)) for t in grouped]


def plan_summary(journal: Sequence[Envelope], keep_turns: int) -> Cut | None:
    """What a summary covers: every turn it would not keep, the latest `keep_turns` kept.
    None when that leaves nothing to summarise but the current task's prompt, which the
    window keeps anyway."""
    summary, rest = unsummarised(journal)
    all_turns = turns(rest)
    covered = all_turns[:-keep_turns]
    task = current_task(journal)
    if not [t for t in covered if task is None or t.first_id != task.id]:
        return None
    return Cut(covered[-1].last_id, summary.text if summary else None, tuple(covered))


def plan_fresh(journal: Sequence[Envelope]) -> Cut | None:
    """What a fresh window's seed stands for: everything but the latest turn. None when
    there is nothing to leave out (a single turn, no summary)."""
    summary, rest = unsummarised(journal)
    all_turns = turns(rest)
    if len(all_turns) >= 2:
        covered = tuple(all_turns[:-1])
        return Cut(covered[-1].last_id, summary.text if summary else None, covered)
    if summary is not None:  # the latest turn is all there is since it: the seed is the summary
        return Cut(summary.through, summary.text, ())
    return None


def summary_request(cut: Cut, max_chars: int) -> tuple[ChatMessage, ...]:
    """The summarisation call's messages: the covered part as a transcript of at most
    `max_chars` characters (the newest turns win when it must be shortened)."""
    transcript = fit_text(cut.previous, cut.covered, max_chars)
    return (
        ChatMessage(role="system", content=SUMMARISER_SYSTEM),
        ChatMessage(
            role="user",
            content=f"{SUMMARISER_INSTRUCTION}\n\n<conversation>\n{transcript}\n</conversation>",
        ),
    )


def fit_text(previous: str | None, covered: Sequence[Turn], max_chars: int) -> str:
    """The previous summary, then as many of the newest covered turns as fit in `max_chars`
    characters, as text, oldest first. The summary is clipped if it alone is too long; the
    first turn that does not fit is clipped into what is left, if that is worth it."""
    budget = max(0, max_chars - len(OMITTED) - 8)  # room for the note on what was left out
    head = ""
    if previous:
        head = f"(summary of what came before)\n{previous}"
        head = head if len(head) <= budget or budget >= MIN_CLIP_CHARS else ""
        head = clip(head, budget)
        budget -= len(head) + 1
    kept: list[str] = []
    for turn in reversed(covered):
        text = render(turn)
        if len(text) + 1 > budget:
            if budget > MIN_CLIP_CHARS:
                kept.append(clip(text, budget - 1))
            break
        kept.append(text)
        budget -= len(text) + 1
    if len(kept) < len(covered):
        kept.append(OMITTED.format(n=len(covered) - len(kept)))
    return "\n".join(([head] if head else []) + list(reversed(kept)))


def chars_for(tokens: int) -> int:
    """How many characters of text `tokens` tokens hold, by the shared estimate."""
    return max(0, tokens) * CHARS_PER_TOKEN


def render(turn: Turn) -> str:
    """One turn as transcript lines."""
    lines = []
    for env in turn.entries:
        payload = env.payload
        if isinstance(payload, TaskPayload):
            lines.append(f"user: {payload.prompt}")
        elif isinstance(payload, LLMResponsePayload):
            message = payload.message
            if message.content:
                lines.append(f"assistant: {message.content}")
            lines.extend(f"assistant called {c.name}({c.arguments})" for c in message.tool_calls)
        elif isinstance(payload, ToolResultPayload):
            failed = f" failed ({payload.error_reason})" if payload.error_reason else " returned"
            lines.append(f"tool {payload.name}{failed}: {payload.result}")
    return "\n".join(lines)


def clip(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[: max(0, max_chars - len(CLIPPED))] + CLIPPED


def _index(journal: Sequence[Envelope], entry_id: str) -> int | None:
    return next((i for i, e in enumerate(journal) if e.id == entry_id), None)
