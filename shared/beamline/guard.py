"""Loop guard: the configuration (`loop_guard:` on an agent or a pool template) and the wire
contract of the loop-detection service (`services/loopguard`).

    agents:
      - name: researcher
        ...
        loop_guard:                       # the default when absent: on, as shown
          same_tool_calls: 3              # the same tool with the same arguments, N times
          similar_outputs: 3              # N near-identical LLM outputs in a row
          similarity: 0.9                 # what "near-identical" means (0..1)
          min_output_chars: 40            # shorter outputs ("ok") are never compared
          scope: conversation             # or task: counts restart with every task
          ladder: [restart, escalate]     # what each loop in a row gets; the last repeats
          escalation_timeout_s: 600       # a human answers within this, or ...
          on_timeout: resume              # ... the agent resumes (or: stop)
          reset_after_s: 3600             # a loop this long after the last starts the ladder again
      - {name: writer, ..., loop_guard: off}

    loopguard  -> bl.sup.guard              GuardCommand  -> GuardReply (the leader acts)
    loopguard  -> bl.escalation.<agent>     an event envelope: escalation_opened | _closed,
                                            its data an `Escalation` (stream BL_ESCALATIONS)
    operator   -> bl.loopguard.list         ListRequest   -> LoopguardReply
    operator   -> bl.loopguard.answer       AnswerRequest -> LoopguardReply
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from beamline.ids import is_token

MAX_ADDENDUM_CHARS = 4000
MAX_SAY_CHARS = 2000
QUOTE_CHARS = 300  # how much of a repeated output or argument list an addendum quotes


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rung(StrEnum):
    """What a loop gets, by its place in the agent's ladder."""

    RESTART = "restart"  # restarted with an addendum to its system prompt for that conversation
    ESCALATE = "escalate"  # paused; a human is asked (bl.escalation.<agent>) and answers
    STOP = "stop"  # stopped and kept stopped (`beamline restart` brings it back)


class OnTimeout(StrEnum):
    RESUME = "resume"
    STOP = "stop"


class Scope(StrEnum):
    CONVERSATION = "conversation"  # repeats count across the tasks of a conversation
    TASK = "task"  # counts start afresh with each task


class LoopKind(StrEnum):
    SAME_TOOL_CALL = "same_tool_call"
    SIMILAR_OUTPUT = "similar_output"


class LoopGuard(_Strict):
    """One agent's loop detection and what it does about a loop (`loop_guard:`)."""

    enabled: bool = True
    same_tool_calls: int = Field(
        default=3, ge=0, description="Identical tool calls that make a loop; 0: not watched."
    )
    similar_outputs: int = Field(
        default=3, ge=0, description="Near-identical outputs in a row that make a loop; 0: off."
    )
    similarity: float = Field(default=0.9, gt=0, le=1, description="difflib ratio, 0..1.")
    min_output_chars: int = Field(default=40, ge=1, description="Shorter outputs are skipped.")
    scope: Scope = Scope.CONVERSATION
    ladder: tuple[Rung, ...] = (Rung.RESTART, Rung.ESCALATE)
    escalation_timeout_s: float = Field(default=600.0, gt=0)
    on_timeout: OnTimeout = OnTimeout.RESUME
    reset_after_s: float = Field(
        default=3600.0, ge=0, description="A quiet spell this long puts the agent back at rung 0."
    )

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, data: Any) -> Any:
        """`loop_guard: off` (YAML reads it as false) or `on`, besides the mapping."""
        if data is False or data == "off":
            return {"enabled": False}
        if data is True or data == "on":
            return {}
        return data

    @field_validator("same_tool_calls", "similar_outputs")
    @classmethod
    def _a_repeat_needs_two(cls, value: int) -> int:
        if value == 1:
            raise ValueError("must be 0 (not watched) or at least 2: one call is no repeat")
        return value

    def rung(self, loops_before: int) -> Rung | None:
        """The rung for a loop that follows `loops_before` others; None: record only."""
        if not self.ladder:
            return None
        return self.ladder[min(loops_before, len(self.ladder) - 1)]


# --- what a loop is, and what the agent is told ---------------------------------------


class Loop(_Strict):
    """A detected loop: what repeated, and how often."""

    kind: LoopKind
    count: int
    tool: str | None = None
    arguments: str | None = None  # canonical JSON of the repeated arguments
    text: str | None = None  # the repeated output (quoted, shortened)

    def describe(self) -> str:
        if self.kind is LoopKind.SAME_TOOL_CALL:
            return (
                f"called the tool `{self.tool}` {self.count} times with the same arguments "
                f"{_quote(self.arguments or '{}')}"
            )
        return f"gave {self.count} nearly identical answers in a row: {_quote(self.text or '')}"


def _quote(text: str) -> str:
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "…"


class Addendum(_Strict):
    """Text appended to an agent's system prompt for one conversation: what it repeated."""

    conversation_id: str = Field(min_length=1, max_length=128)
    text: str = Field(min_length=1, max_length=MAX_ADDENDUM_CHARS)


def addendum_text(loop: Loop, say: str | None = None) -> str:
    """What a restarted (or resumed) agent reads at the end of its system prompt."""
    text = (
        f"Loop guard: in this conversation you {loop.describe()}. Repeating it is not getting "
        "you closer to an answer, and you were restarted because of it. Do not repeat it: try "
        "a different approach, or give your best answer now and say what is missing."
    )
    if say:
        text += f"\nA human operator reviewed this loop and says: {say}"
    return text[:MAX_ADDENDUM_CHARS]


def with_addendum(prompt: str, addendum: Addendum | None, conversation_id: str) -> str:
    """The system prompt with `addendum` appended, when it is for this conversation;
    unchanged otherwise."""
    if addendum is None or addendum.conversation_id != conversation_id:
        return prompt
    return f"{prompt}\n\n{addendum.text}" if prompt else addendum.text


# --- loopguard -> supervisor ------------------------------------------------------------


class GuardAction(StrEnum):
    RESTART = "restart"  # kill it, start it again with `addendum`: not a crash, no intensity
    SUSPEND = "suspend"  # kill it and keep it stopped until resumed (`beamline ps`: suspended)
    RESUME = "resume"  # start it again (with `addendum` when given)
    STOP = "stop"  # stop it and keep it stopped; `beamline restart` brings it back


class GuardCommand(_Strict):
    """A request on `bl.sup.guard`; the leading supervisor carries it out and answers.
    `id` makes a repeat (a re-send after a lost answer) harmless."""

    id: str = Field(min_length=1, max_length=128)
    action: GuardAction
    agent: str = Field(min_length=1, max_length=128)
    addendum: Addendum | None = None
    reason: str = Field(default="", max_length=MAX_ADDENDUM_CHARS)  # what repeated
    escalation: str | None = None

    @field_validator("agent")
    @classmethod
    def _agent_is_token(cls, value: str) -> str:
        if not is_token(value):
            raise ValueError("must be 1-128 of A-Z a-z 0-9 _ -")
        return value


class GuardReply(_Strict):
    ok: bool = True
    error: str | None = None
    reason: str | None = None
    state: str | None = None  # the agent as its supervisor sees it afterwards


# --- escalations ---------------------------------------------------------------------------


class EscalationStatus(StrEnum):
    OPEN = "open"
    ANSWERED = "answered"
    TIMED_OUT = "timed_out"


class Escalation(_Strict):
    """A loop a human is asked about; the agent stays suspended until it is closed."""

    id: str
    agent: str
    conversation_id: str
    loop: Loop
    opened_at: float  # unix seconds
    deadline: float  # unix seconds: then `on_timeout` applies
    on_timeout: OnTimeout
    status: EscalationStatus = EscalationStatus.OPEN
    outcome: OnTimeout | None = None  # resume or stop, once closed
    answered_by: str | None = None
    say: str | None = None
    closed_at: float | None = None
    how_to_answer: str = ""
    trace_id: str = ""  # the looping task's trace: the escalation's messages join it


def how_to_answer(escalation_id: str) -> str:
    return (
        f"`beamline escalation answer {escalation_id} --resume [--say TEXT]` or `--stop`; or "
        f'a request on bl.loopguard.answer: {{"id": "{escalation_id}", "action": '
        '"resume" | "stop", "say": "optional advice for the agent"}'
    )


class ListRequest(_Strict):
    agent: str | None = None
    include_closed: bool = False


class AnswerRequest(_Strict):
    id: str = Field(min_length=1, max_length=128)
    action: OnTimeout  # resume | stop
    say: str | None = Field(default=None, max_length=MAX_SAY_CHARS)
    agent: str | None = None  # when given, must be the escalation's agent
    answered_by: str = Field(default="operator", max_length=128)


class LoopguardReply(_Strict):
    ok: bool = True
    reason: str | None = None
    error: str | None = None
    result: dict[str, Any] = Field(default_factory=dict)
