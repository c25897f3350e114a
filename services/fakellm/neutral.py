"""The provider-neutral view of one LLM call: what was asked, and what to answer.

The wire modules turn OpenAI and Anthropic bodies into an `LLMRequest`, the script picks a
`Reply`, and the wire modules render that reply back in the provider's format. No I/O here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["user", "assistant", "tool"]
Provider = Literal["openai", "anthropic"]


class BadRequest(ValueError):
    """The request body is unusable; answered with a 400 in the provider's error format."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCall:
    """A tool call the assistant made earlier in the conversation."""

    id: str
    name: str
    arguments: str  # JSON text, as the provider carries it


@dataclass(frozen=True)
class ToolResult:
    """The result of an earlier tool call, sent back by the client."""

    tool_call_id: str
    name: str | None  # resolved from the matching tool call; None when there is none
    content: str
    is_error: bool = False


@dataclass(frozen=True)
class Message:
    """One turn. Anthropic user turns that carry tool_result blocks have the role `tool`."""

    role: Role
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_results: tuple[ToolResult, ...] = ()


@dataclass(frozen=True)
class LLMRequest:
    provider: Provider
    model: str
    system: str
    messages: tuple[Message, ...]
    tools: tuple[str, ...] = ()  # names of the tools offered
    stream: bool = False
    stream_usage: bool = True  # OpenAI: only with stream_options.include_usage

    @property
    def last_role(self) -> Role | None:
        return self.messages[-1].role if self.messages else None

    @property
    def last_user_text(self) -> str:
        """Text of the last message with the role `user` ("" when there is none)."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text
        return ""

    @property
    def trailing_tool_results(self) -> tuple[ToolResult, ...]:
        """Tool results in the run of `tool` messages that ends the conversation."""
        results: list[ToolResult] = []
        for message in reversed(self.messages):
            if message.role != "tool":
                break
            results[:0] = message.tool_results
        return tuple(results)

    @property
    def last_tool_result(self) -> str:
        """Content of the latest tool result anywhere in the conversation ("" if none)."""
        for message in reversed(self.messages):
            if message.tool_results:
                return message.tool_results[-1].content
        return ""

    @property
    def input_chars(self) -> int:
        """System text plus all message text and tool result content."""
        total = len(self.system)
        for message in self.messages:
            total += len(message.text) + sum(len(r.content) for r in message.tool_results)
        return total


@dataclass(frozen=True)
class ReplyToolCall:
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class Reply:
    """What the assistant answers: text, or one or more tool calls."""

    text: str = ""
    tool_calls: tuple[ReplyToolCall, ...] = field(default=())

    @property
    def output_chars(self) -> int:
        if self.tool_calls:
            return sum(len(call.arguments_json) for call in self.tool_calls)
        return len(self.text)


def tokens(chars: int) -> int:
    """Deterministic token count: a quarter of the characters, rounded up, at least 1."""
    return max(1, math.ceil(chars / 4))


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int

    @classmethod
    def of(cls, request: LLMRequest, reply: Reply) -> Usage:
        return cls(tokens(request.input_chars), tokens(reply.output_chars))


def tool_pairing_error(messages: tuple[Message, ...]) -> str | None:
    """What real providers reject about tool calls and results, or None when all is well.

    Every assistant turn with tool calls must be followed directly by results for exactly
    those calls, and every tool result must answer a call of the turn just before it.
    """
    i = 0
    while i < len(messages):
        message = messages[i]
        if message.role == "tool":
            return f"messages[{i}]: tool results must follow an assistant turn with tool calls"
        i += 1
        if message.role != "assistant" or not message.tool_calls:
            continue
        expected = [call.id for call in message.tool_calls]
        if len(set(expected)) != len(expected):
            return f"messages[{i - 1}]: tool call ids must be unique"
        answered: list[str] = []
        while i < len(messages) and messages[i].role == "tool":
            answered += [result.tool_call_id for result in messages[i].tool_results]
            i += 1
        unknown = [x for x in answered if x not in expected]
        if unknown:
            return f"messages[{i - 1}]: tool result for unknown tool call id {unknown[0]!r}"
        missing = [x for x in expected if x not in answered]
        if missing:
            return f"messages[{i - 1}]: tool call id {missing[0]!r} has no tool result"
    return None
