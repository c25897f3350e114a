"""What both provider formats share: the `Wire` interface, id minting, SSE framing helpers."""

from __future__ import annotations

import itertools
import re
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from services.fakellm.neutral import LLMRequest, Provider, Reply, Usage


@dataclass(frozen=True)
class Stream:
    """A complete SSE stream, frame by frame, and where `hang_mid_stream` stops sending."""

    frames: tuple[bytes, ...]
    hang_after: int  # frames sent before the stream goes silent (always before the end)


class Ids:
    """Response and tool call ids, unique within a process run and across runs."""

    def __init__(self, run: str | None = None) -> None:
        self.run = run or secrets.token_hex(3)
        self._counter = itertools.count(1)

    def new(self, prefix: str) -> str:
        return f"{prefix}{self.run}_{next(self._counter)}"


class Wire(Protocol):
    """One provider's wire format: parse requests, render replies, errors and broken bodies."""

    @property
    def provider(self) -> Provider: ...

    @property
    def request_id_header(self) -> str: ...

    def parse(self, body: Any) -> LLMRequest:
        """The neutral request; raises `BadRequest` for what the real API would reject."""
        ...

    def body(self, request: LLMRequest, reply: Reply, usage: Usage, ids: Ids) -> dict[str, Any]:
        """The non-streaming response body."""
        ...

    def stream(self, request: LLMRequest, reply: Reply, usage: Usage, ids: Ids) -> Stream:
        """The streaming response, as SSE frames."""
        ...

    def error(
        self, status: int, message: str | None = None, param: str | None = None
    ) -> dict[str, Any]:
        """An error body in the provider's format; a stock message when `message` is None."""
        ...

    def malformed(self, request: LLMRequest, ids: Ids) -> bytes:
        """A 200 body (or SSE stream when `request.stream`) that is not valid JSON."""
        ...


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def truncated(obj: Any) -> bytes:
    """The first half of a JSON object: never valid JSON (the closing brace is missing)."""
    text = dumps(obj)
    return text[: max(1, len(text) // 2)]


def split_text(text: str) -> list[str]:
    """Word-sized pieces that concatenate back to `text`."""
    return re.findall(r"\S+\s*|\s+", text)


def split_every(text: str, size: int = 16) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def retry_after_value(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)
