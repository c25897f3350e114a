"""Anthropic Messages: `POST /v1/messages`, message objects and the event stream."""

from __future__ import annotations

import json
from typing import Any, Literal

from services.fakellm.neutral import (
    BadRequest,
    LLMRequest,
    Message,
    Reply,
    ToolCall,
    ToolResult,
    Usage,
    tool_pairing_error,
)
from services.fakellm.wire import Ids, Stream, dumps, split_every, split_text, truncated

_ERRORS = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low."),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timeout"),
    529: ("overloaded_error", "Overloaded"),
}


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + dumps({"type": kind, **data}) + b"\n\n"


def _block_text(content: Any, where: str) -> str:
    """Text of a string or a list of text blocks (other block types are ignored)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where}: Input should be a valid string or list", where)
    texts = []
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise BadRequest(f"{where}.{i}: Input should be a content block object", where)
        if block["type"] == "text":
            if not isinstance(block.get("text"), str):
                raise BadRequest(f"{where}.{i}.text: Field required", where)
            texts.append(block["text"])
    return "\n".join(texts)


def _message(item: Any, index: int, names: dict[str, str]) -> Message:
    where = f"messages.{index}"
    if not isinstance(item, dict):
        raise BadRequest(f"{where}: Input should be a valid dictionary", where)
    role = item.get("role")
    if role not in ("user", "assistant"):
        raise BadRequest(f"{where}.role: Input should be 'user' or 'assistant'", f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        return Message(role, content)
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content: Field required", f"{where}.content")
    texts: list[str] = []
    calls: list[ToolCall] = []
    results: list[ToolResult] = []
    for i, block in enumerate(content):
        at = f"{where}.content.{i}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise BadRequest(f"{at}: Input should be a content block object", at)
        kind = block["type"]
        if kind == "text":
            texts.append(_block_text([block], at))
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise BadRequest(f"{at}: tool_use needs id and name", at)
            calls.append(ToolCall(block["id"], block["name"], json.dumps(block.get("input", {}))))
            names[block["id"]] = block["name"]
        elif kind == "tool_result" and role == "user":
            use_id = block.get("tool_use_id")
            if not isinstance(use_id, str):
                raise BadRequest(f"{at}.tool_use_id: Field required", at)
            text = _block_text(block.get("content"), f"{at}.content")
            results.append(
                ToolResult(use_id, names.get(use_id), text, block.get("is_error") is True)
            )
        elif kind in ("tool_use", "tool_result"):
            raise BadRequest(f"{at}: {kind} blocks are not allowed in {role} messages", at)
    text = "\n".join(texts)
    if results:
        return Message("tool", text, tool_results=tuple(results))
    return Message(role, text, tool_calls=tuple(calls))


class AnthropicWire:
    provider: Literal["anthropic"] = "anthropic"
    request_id_header = "request-id"

    def parse(self, body: Any) -> LLMRequest:
        if not isinstance(body, dict):
            raise BadRequest("Input should be a valid dictionary")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model: Field required", "model")
        raw = body.get("messages")
        if not isinstance(raw, list):
            raise BadRequest("messages: Field required", "messages")
        if not raw:
            raise BadRequest("messages: at least one message is required", "messages")
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest("max_tokens: Field required", "max_tokens")
        names: dict[str, str] = {}
        messages = tuple(_message(item, i, names) for i, item in enumerate(raw))
        pairing = tool_pairing_error(messages)
        if pairing:
            raise BadRequest(pairing, "messages")
        tools = body.get("tools") or []
        if not isinstance(tools, list) or not all(
            isinstance(tool, dict) and isinstance(tool.get("name"), str) for tool in tools
        ):
            raise BadRequest("tools: each tool needs a name", "tools")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream: Input should be a valid boolean", "stream")
        return LLMRequest(
            provider="anthropic",
            model=model,
            system=_block_text(body.get("system"), "system"),
            messages=messages,
            tools=tuple(tool["name"] for tool in tools),
            stream=stream,
            stream_usage=True,
        )

    @staticmethod
    def _content(reply: Reply, ids: Ids) -> list[dict[str, Any]]:
        if reply.tool_calls:
            return [
                {"type": "tool_use", "id": ids.new("toolu_"), "name": c.name, "input": c.arguments}
                for c in reply.tool_calls
            ]
        return [{"type": "text", "text": reply.text}]

    @staticmethod
    def _message(request: LLMRequest, ids: Ids) -> dict[str, Any]:
        return {
            "id": ids.new("msg_"),
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }

    @staticmethod
    def _usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
        return {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
        }

    def body(self, request: LLMRequest, reply: Reply, usage: Usage, ids: Ids) -> dict[str, Any]:
        return {
            **self._message(request, ids),
            "content": self._content(reply, ids),
            "stop_reason": "tool_use" if reply.tool_calls else "end_turn",
            "usage": self._usage(usage.input_tokens, usage.output_tokens),
        }

    def stream(self, request: LLMRequest, reply: Reply, usage: Usage, ids: Ids) -> Stream:
        start = {**self._message(request, ids), "usage": self._usage(usage.input_tokens, 1)}
        frames = [_event("message_start", {"message": start})]
        hang_after = 0
        for index, block in enumerate(self._content(reply, ids)):
            if block["type"] == "text":
                opening: dict[str, Any] = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": p} for p in split_text(block["text"])]
            else:
                opening = {**block, "input": {}}
                pieces = split_every(json.dumps(block["input"], ensure_ascii=False))
                deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces]
            frames.append(_event("content_block_start", {"index": index, "content_block": opening}))
            if index == 0:
                frames.append(_event("ping", {}))
            for delta in deltas:
                frames.append(_event("content_block_delta", {"index": index, "delta": delta}))
                hang_after = hang_after or len(frames)
            hang_after = hang_after or len(frames)
            frames.append(_event("content_block_stop", {"index": index}))
        stop = "tool_use" if reply.tool_calls else "end_turn"
        frames.append(
            _event(
                "message_delta",
                {
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": usage.output_tokens},
                },
            )
        )
        frames.append(_event("message_stop", {}))
        return Stream(tuple(frames), hang_after)

    def error(
        self, status: int, message: str | None = None, param: str | None = None
    ) -> dict[str, Any]:
        default_kind = "api_error" if status >= 500 else "invalid_request_error"
        kind, text = _ERRORS.get(status, (default_kind, f"fakellm injected HTTP {status}"))
        return {"type": "error", "error": {"type": kind, "message": message or text}}

    def malformed(self, request: LLMRequest, ids: Ids) -> bytes:
        if request.stream:
            start = {"type": "message_start", "message": self._message(request, ids)}
            return b"event: message_start\ndata: " + truncated(start) + b"\n\n"
        return truncated(self.body(request, Reply(text="malformed"), Usage(1, 1), ids))
