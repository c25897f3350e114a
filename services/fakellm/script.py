"""The script: rules that say what to answer and which fault to inject. Pure, no I/O.

`load_script` validates YAML text into a `Script` (or raises `ScriptError` naming the field);
`decide` picks the first rule that matches a request and still has `times` left.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.fakellm.neutral import LLMRequest, Reply, ReplyToolCall

FaultKind = Literal["status", "hang", "hang_mid_stream", "malformed"]


class ScriptError(ValueError):
    """A script that cannot be used; the message names the offending field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Match(_Model):
    """All given conditions must hold."""

    contains: str | None = None
    regex: str | None = None
    system_contains: str | None = None
    model: str | None = None
    last_role: Literal["user", "assistant", "tool"] | None = None
    tool_result_for: str | None = None
    has_tools: bool | None = None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value


class ToolCallSpec(_Model):
    name: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)


class Respond(_Model):
    """Exactly one of `text`, `tool_calls`, `json`."""

    text: str | None = None
    tool_calls: list[ToolCallSpec] | None = Field(default=None, min_length=1)
    json_: Any = Field(default=None, alias="json")

    @model_validator(mode="after")
    def _exactly_one(self) -> Respond:
        given = [name for name in ("text", "tool_calls") if getattr(self, name) is not None]
        if "json_" in self.model_fields_set:
            given.append("json")
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise ValueError(f"exactly one of text, tool_calls, json is required (got {found})")
        return self


class Fault(_Model):
    """`latency_ms` combines with anything; at most one of the others."""

    latency_ms: int = Field(default=0, ge=0)
    status: int | None = Field(default=None, ge=400, le=599)
    retry_after_s: float | None = Field(default=None, ge=0)
    message: str | None = None
    hang: bool = False
    hang_mid_stream: bool = False
    malformed: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> Fault:
        kinds = [
            name
            for name, on in (
                ("status", self.status is not None),
                ("hang", self.hang),
                ("hang_mid_stream", self.hang_mid_stream),
                ("malformed", self.malformed),
            )
            if on
        ]
        if len(kinds) > 1:
            raise ValueError(
                f"at most one of status, hang, hang_mid_stream, malformed (got {kinds})"
            )
        if self.status is None and (self.retry_after_s is not None or self.message is not None):
            raise ValueError("retry_after_s and message need status")
        return self

    @property
    def kind(self) -> FaultKind | None:
        if self.status is not None:
            return "status"
        if self.hang:
            return "hang"
        if self.hang_mid_stream:
            return "hang_mid_stream"
        if self.malformed:
            return "malformed"
        return None


class Rule(_Model):
    name: str = ""  # defaults to "rules[<index>]"
    match: Match = Field(default_factory=Match)
    respond: Respond | None = None  # None: the script's default answer
    fault: Fault | None = None
    times: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _does_something(self) -> Rule:
        if self.respond is None and self.fault is None:
            raise ValueError("a rule needs respond or fault")
        return self


ECHO = Respond(text="echo: {last_user}")


class Script(_Model):
    rules: list[Rule] = Field(default_factory=list)
    default: Respond = Field(default_factory=lambda: ECHO.model_copy())

    @model_validator(mode="after")
    def _names(self) -> Script:
        seen: set[str] = set()
        for index, rule in enumerate(self.rules):
            if not rule.name:
                rule.name = f"rules[{index}]"
            if rule.name in seen:
                raise ValueError(f"rules[{index}].name: duplicate rule name {rule.name!r}")
            seen.add(rule.name)
        return self


def default_script() -> Script:
    """The built-in script: no rules, echo the last user message."""
    return Script()


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe(exc: ValidationError) -> str:
    """One line naming every failing field, e.g. `rules[0].respond: exactly one of ...`."""
    parts = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        where = _loc(tuple(error["loc"]))
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def parse_script(data: Any) -> Script:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ScriptError("script: must be a mapping with `rules` and `default`")
    try:
        return Script.model_validate(data)
    except ValidationError as exc:
        raise ScriptError(describe(exc)) from None


def load_script(text: str) -> Script:
    """Validate YAML text into a Script; raises ScriptError with a one-line reason."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScriptError("script: not valid YAML: " + " ".join(str(exc).split())) from None
    return parse_script(data)


@dataclass
class ScriptState:
    """How often each rule (by index) has been chosen; `times` counts against this."""

    counts: dict[int, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.counts.clear()


@dataclass(frozen=True)
class Decision:
    rule: str | None  # the rule's name; None when the default answered
    reply: Reply
    fault: Fault | None


def matches(match: Match, request: LLMRequest) -> bool:
    last_user = request.last_user_text
    if match.contains is not None and match.contains.lower() not in last_user.lower():
        return False
    if match.regex is not None and re.search(match.regex, last_user) is None:
        return False
    if (
        match.system_contains is not None
        and match.system_contains.lower() not in request.system.lower()
    ):
        return False
    if match.model is not None and match.model != request.model:
        return False
    if match.last_role is not None and match.last_role != request.last_role:
        return False
    if match.tool_result_for is not None and not any(
        result.name == match.tool_result_for for result in request.trailing_tool_results
    ):
        return False
    return match.has_tools is None or match.has_tools == bool(request.tools)


def _fill(value: Any, request: LLMRequest) -> Any:
    """Replace {last_user} and {last_tool_result} in every string inside `value`."""
    if isinstance(value, str):
        return value.replace("{last_user}", request.last_user_text).replace(
            "{last_tool_result}", request.last_tool_result
        )
    if isinstance(value, list):
        return [_fill(item, request) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, request) for key, item in value.items()}
    return value


def render(respond: Respond, request: LLMRequest) -> Reply:
    if respond.tool_calls is not None:
        return Reply(
            tool_calls=tuple(
                ReplyToolCall(call.name, _fill(call.arguments, request))
                for call in respond.tool_calls
            )
        )
    if respond.text is not None:
        return Reply(text=_fill(respond.text, request))
    return Reply(text=json.dumps(_fill(respond.json_, request), ensure_ascii=False))


def decide(script: Script, request: LLMRequest, state: ScriptState) -> Decision:
    """The first rule that matches and has `times` left wins; it is counted in `state`."""
    for index, rule in enumerate(script.rules):
        used = state.counts.get(index, 0)
        if rule.times is not None and used >= rule.times:
            continue
        if not matches(rule.match, request):
            continue
        state.counts[index] = used + 1
        reply = render(rule.respond or script.default, request)
        return Decision(rule.name, reply, rule.fault)
    return Decision(None, render(script.default, request), None)
