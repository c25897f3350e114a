"""The provider-neutral side of the wire formats: what every provider mapping produces.

A wire format is pure: it turns an `LLMRequestPayload` into an HTTP request (path, headers,
JSON body) and a parsed JSON response body back into a `Completion`. The HTTP itself, retries
and the breaker live in `upstream.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from beamline.envelope import ChatMessage, LLMRequestPayload, Usage


class BadResponse(Exception):
    """The provider answered 2xx with a body we cannot read as a completion."""


@dataclass(frozen=True)
class Completion:
    message: ChatMessage
    usage: Usage
    finish_reason: str | None
    model: str


@dataclass(frozen=True)
class HttpRequest:
    path: str  # relative to the provider's base_url
    headers: dict[str, str]
    body: dict[str, Any]


class WireFormat(Protocol):
    def build(self, request: LLMRequestPayload, api_key: str | None) -> HttpRequest: ...

    def parse(self, body: Any, request: LLMRequestPayload) -> Completion: ...


def error_text(body: Any, raw: str) -> str:
    """The provider's own error message from an error body (both formats nest it under
    `error.message`), else the raw text."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return raw.strip() or "(empty body)"


def need(data: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`data[key]`, checked to be of `kind`; BadResponse naming the path otherwise."""
    if not isinstance(data, dict):
        raise BadResponse(f"{where}: expected an object, got {type(data).__name__}")
    if key not in data:
        raise BadResponse(f"{where}.{key}: missing")
    value = data[key]
    if not isinstance(value, kind):
        raise BadResponse(f"{where}.{key}: unexpected {type(value).__name__}")
    return value


def token_count(usage: Any, key: str) -> int:
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and value >= 0 else 0


def wire_for(kind: str) -> WireFormat:
    # imported here: each format module imports the shared types above
    from services.gateway.anthropic_provider import AnthropicWire
    from services.gateway.openai_provider import OpenAIWire

    formats: dict[str, WireFormat] = {"openai": OpenAIWire(), "anthropic": AnthropicWire()}
    return formats[kind]
