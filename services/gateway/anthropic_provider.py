"""Anthropic Messages: `POST {base_url}/messages`.

Differences from the neutral (OpenAI) shape this mapping absorbs:
- system prompts are a top-level `system` field, not messages;
- an assistant's tool calls are `tool_use` content blocks with a parsed `input` object;
- tool results are `tool_result` blocks inside a *user* message, and consecutive messages of
  one role are merged because the API expects user and assistant turns to alternate;
- there is no `response_format`: JSON output is asked for in the system prompt;
- stop reasons are mapped to OpenAI's finish reasons so callers see one vocabulary.
"""

from __future__ import annotations

import json
from typing import Any

from beamline.envelope import ChatMessage, LLMRequestPayload, ToolCall, Usage
from services.gateway.providers import Completion, HttpRequest, need, token_count

API_VERSION = "2023-06-01"
JSON_INSTRUCTION = "Respond with a single JSON object and nothing else."
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def _input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic wants. Text that is not a JSON object
    (a model can emit that) is kept under `_raw_arguments` rather than failing the whole
    conversation it is part of."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {"_raw_arguments": arguments}
    return value if isinstance(value, dict) else {"_raw_arguments": arguments}


def _blocks(msg: ChatMessage) -> tuple[str, list[dict[str, Any]]]:
    """(role, content blocks) for one non-system neutral message."""
    if msg.role == "tool":
        block = {"type": "tool_result", "tool_use_id": msg.tool_call_id or "", "content": ""}
        if msg.content:
            block["content"] = msg.content
        return "user", [block]
    blocks: list[dict[str, Any]] = []
    if msg.content:
        blocks.append({"type": "text", "text": msg.content})
    if msg.role == "assistant":
        blocks += [
            {"type": "tool_use", "id": c.id, "name": c.name, "input": _input(c.arguments)}
            for c in msg.tool_calls
        ]
    return msg.role, blocks


def to_messages(messages: tuple[ChatMessage, ...]) -> tuple[str | None, list[dict[str, Any]]]:
    """(system prompt, Anthropic messages) from neutral messages."""
    system = [m.content for m in messages if m.role == "system" and m.content]
    out: list[dict[str, Any]] = []
    for msg in messages:
        if msg.role == "system":
            continue
        role, blocks = _blocks(msg)
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return ("\n\n".join(system) if system else None), out


def from_content(content: list[Any]) -> ChatMessage:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for i, block in enumerate(content):
        where = f"content[{i}]"
        btype = need(block, "type", str, where)
        if btype == "text":
            texts.append(need(block, "text", str, where))
        elif btype == "tool_use":
            calls.append(
                ToolCall(
                    id=need(block, "id", str, where),
                    name=need(block, "name", str, where),
                    arguments=json.dumps(need(block, "input", dict, where)),
                )
            )
        # other blocks (thinking, ...) carry nothing the neutral shape can hold
    return ChatMessage(
        role="assistant", content="".join(texts) if texts else None, tool_calls=tuple(calls)
    )


class AnthropicWire:
    def build(self, request: LLMRequestPayload, api_key: str | None) -> HttpRequest:
        system, messages = to_messages(request.messages)
        if request.json_output:
            system = f"{system}\n\n{JSON_INSTRUCTION}" if system else JSON_INSTRUCTION
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": messages,
        }
        if system:
            body["system"] = system
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.tools:
            body["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.parameters}
                for t in request.tools
            ]
        headers = {"content-type": "application/json", "anthropic-version": API_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return HttpRequest("/messages", headers, body)

    def parse(self, body: Any, request: LLMRequestPayload) -> Completion:
        message = from_content(need(body, "content", list, "response"))
        usage = body.get("usage")
        stop = body.get("stop_reason")
        model = body.get("model")
        return Completion(
            message=message,
            usage=Usage(
                input_tokens=token_count(usage, "input_tokens"),
                output_tokens=token_count(usage, "output_tokens"),
            ),
            finish_reason=FINISH_REASONS.get(stop, stop) if isinstance(stop, str) else None,
            model=model if isinstance(model, str) and model else request.model,
        )
