"""Budgets: the configuration (token and cost limits, the price table) and the wire contract
of the budget service (`services/budget`).

    agents:
      - {name: analyst, ..., budget: {tokens: 200000, usd: 2.5}}
    supervisors:
      - {name: analysis, ..., budget: {usd: 10}}      # covers its whole subtree
    prices:                                           # USD per million tokens
      openai: {gpt-4o-mini: {input: 0.15, output: 0.6}}

An agent's call is charged to its own account and to every ancestor supervisor's account; it
may go ahead only when each of them can cover its estimate (`Reservation`). Accounts are
named `agent:<name>` and `supervisor:<name>` so an agent and a supervisor may share a name.

    gateway  -> bl.budget.reserve   ReserveRequest  -> BudgetReply (request/reply)
    operator -> bl.budget.raise     RaiseRequest    -> BudgetReply
    operator -> bl.budget.show      ShowRequest     -> BudgetReply
    budget   -> bl.sup.budget       SubtreeExhausted -> ControlReply (the leader acks)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from beamline.envelope import ChatMessage, LLMRequestPayload, ToolSpec

MILLION = 1_000_000
# Per message, providers add a few tokens of framing (role, separators) to the text's own.
MESSAGE_OVERHEAD_TOKENS = 4
# Characters per token: 4 is the usual English average; a lower number over-estimates, which
# is the safe side for a reservation (the unused part is released when the call settles).
CHARS_PER_TOKEN = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(_Strict):
    """A limit on what a subtree may spend, in tokens (input + output), in USD, or both."""

    tokens: int | None = Field(default=None, ge=0, description="input + output tokens")
    usd: float | None = Field(default=None, ge=0, description="cost from the price table")

    @model_validator(mode="after")
    def _says_something(self) -> Budget:
        if self.tokens is None and self.usd is None:
            raise ValueError("a budget sets `tokens`, `usd` or both")
        return self

    def raised(self, other: Budget | None) -> Budget:
        """Each limit at the larger of the two (a runtime raise never lowers the file's)."""
        if other is None:
            return self
        return Budget(tokens=_larger(self.tokens, other.tokens), usd=_larger(self.usd, other.usd))


def _larger(a: float | None, b: float | None) -> Any:
    return b if a is None else a if b is None else max(a, b)


class Price(_Strict):
    """USD per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / MILLION


class AccountKind(StrEnum):
    AGENT = "agent"
    SUPERVISOR = "supervisor"


class Account(_Strict):
    """One level of an agent's chain: the agent itself, then each ancestor supervisor."""

    kind: AccountKind
    name: str
    budget: Budget | None = None

    @property
    def key(self) -> str:
        return account_key(self.kind, self.name)


def account_key(kind: AccountKind, name: str) -> str:
    return f"{kind.value}:{name}"


def estimate_input_tokens(payload: LLMRequestPayload) -> int:
    """An upper estimate of a request's input tokens from its size, without a tokenizer:
    every character of text, tool calls and tool specs, plus framing per message."""
    return estimate_tokens(payload.messages, payload.tools)


def estimate_tokens(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> int:
    """`estimate_input_tokens` of a request made of these messages and tools: the one
    estimate shared by budget reservations and the agents' context windows."""
    chars = 0
    for message in messages:
        chars += len(message.content or "")
        chars += sum(len(c.name) + len(c.arguments) for c in message.tool_calls)
    chars += sum(len(t.name) + len(t.description) + len(str(t.parameters)) for t in tools)
    framing = MESSAGE_OVERHEAD_TOKENS * len(messages)
    return math.ceil(chars / CHARS_PER_TOKEN) + framing


# --- the wire contract ------------------------------------------------------------------


class ReserveRequest(_Strict):
    """Before a provider call: hold `input_tokens` + `output_tokens` (and their cost) against
    the agent's chain. `request_id` (the LLM request envelope's id) makes it idempotent."""

    request_id: str = Field(min_length=1, max_length=128)
    agent: str = Field(min_length=1, max_length=128)
    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0, description="the request's max_tokens")
    conversation_id: str = ""
    trace_id: str = Field(default="", pattern=r"^([0-9a-f]{32})?$")


class RaiseRequest(_Strict):
    """Raise an account's limits at run time; a lower value than the current one is refused."""

    kind: AccountKind | None = None  # needed only when an agent and a supervisor share the name
    name: str = Field(min_length=1, max_length=128)
    budget: Budget
    requested_by: str = "operator"


class ShowRequest(_Strict):
    name: str | None = None  # one account's name (agent or supervisor), or every account


class BudgetReply(_Strict):
    ok: bool = True
    reason: str | None = None  # an errors.Reason value when not ok
    error: str | None = None
    result: dict[str, Any] = Field(default_factory=dict)


class ConversationSpend(_Strict):
    """What an agent spent in one conversation: the partial results its journal keeps."""

    agent: str
    conversation_id: str
    calls: int  # settled
    tokens: int
    usd: float
    in_flight: int = 0  # calls reserved whose outcome is not settled yet


class SubtreeExhausted(_Strict):
    """To the supervisor: stop this agent or supervisor with its subtree (`budget_exhausted`)."""

    kind: AccountKind
    name: str
    limit: Budget
    spent_tokens: int
    spent_usd: float
    refused_request: str  # the request id whose reservation was refused
    refused_agent: str
    conversations: tuple[ConversationSpend, ...] = ()
