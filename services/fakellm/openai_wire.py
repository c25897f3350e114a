"""OpenAI Chat Completions: `POST /v1/chat/completions`, chat.completion(.chunk) objects."""

from __future__ import annotations

import time
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

FINGERPRINT = "fp_fakellm"

_MESSAGES = {
    400: "Invalid request.",
    401: "Incorrect API key provided.",
    403: "You are not allowed to sample from this model.",
    404: "The model does not exist or you do not have access to it.",
    429: "Rate limit reached for requests. Please try again later.",
    500: "The server had an error while processing your request. Sorry about that!",
    503: "The engine is currently overloaded, please try again later.",
}


def _text(content: Any, where: str) -> str:
    """A message's text: a string, null, or a list of content parts (text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise BadRequest(
                    f"Invalid value for '{where}[{i}]': expected a content part.", where
                )
            if part["type"] in ("text", "refusal"):
                value = part.get(part["type"])
                if not isinstance(value, str):
                    raise BadRequest(f"Missing required parameter: '{where}[{i}].text'.", where)
                texts.append(value)
        return "\n".join(texts)
    raise BadRequest(f"Invalid type for '{where}': expected a string or an array.", where)


def _tool_calls(raw: Any, where: str) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise BadRequest(f"Invalid type for '{where}': expected an array.", where)
    calls = []
    for i, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or not isinstance(call.get("id"), str)
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            raise BadRequest(
                f"Invalid value for '{where}[{i}]': expected "
                "{id, type: 'function', function: {name, arguments}}.",
                f"{where}[{i}]",
            )
        calls.append(ToolCall(call["id"], function["name"], function["arguments"]))
    return tuple(calls)


def _tools(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise BadRequest("Invalid type for 'tools': expected an array.", "tools")
    names = []
    for i, tool in enumerate(raw):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"Missing required parameter: 'tools[{i}].function.name'.", "tools")
        names.append(function["name"])
    return tuple(names)


class OpenAIWire:
    provider: Literal["openai"] = "openai"
    request_id_header = "x-request-id"

    def parse(self, body: Any) -> LLMRequest:
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("you must provide a model parameter", "model")
        raw = body.get("messages")
        if raw is None:
            raise BadRequest("Missing required parameter: 'messages'.", "messages")
        if not isinstance(raw, list) or not raw:
            raise BadRequest("Invalid 'messages': expected a non-empty array.", "messages")
        system: list[str] = []
        messages: list[Message] = []
        names: dict[str, str] = {}
        for i, item in enumerate(raw):
            where = f"messages[{i}]"
            if not isinstance(item, dict):
                raise BadRequest(f"Invalid type for '{where}': expected an object.", where)
            role = item.get("role")
            text = _text(item.get("content"), f"{where}.content")
            if role in ("system", "developer"):
                system.append(text)
            elif role == "user":
                messages.append(Message("user", text))
            elif role == "assistant":
                calls = _tool_calls(item.get("tool_calls"), f"{where}.tool_calls")
                names.update((call.id, call.name) for call in calls)
                messages.append(Message("assistant", text, tool_calls=calls))
            elif role == "tool":
                call_id = item.get("tool_call_id")
                if not isinstance(call_id, str):
                    raise BadRequest(f"Missing required parameter: '{where}.tool_call_id'.", where)
                result = ToolResult(call_id, names.get(call_id), text)
                messages.append(Message("tool", tool_results=(result,)))
            else:
                raise BadRequest(
                    f"Invalid value for '{where}.role': {role!r}; supported: "
                    "'system', 'developer', 'user', 'assistant', 'tool'.",
                    f"{where}.role",
                )
        if not messages:
            raise BadRequest("Invalid 'messages': no user or assistant message.", "messages")
        pairing = tool_pairing_error(tuple(messages))
        if pairing:
            raise BadRequest(f"Invalid 'messages': {pairing}.", "messages")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("Invalid type for 'stream': expected a boolean.", "stream")
        options = body.get("stream_options")
        if options is not None and not stream:
            raise BadRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
            )
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return LLMRequest(
            provider="openai",
            model=model,
            system="\n".join(system),
            messages=tuple(messages),
            tools=_tools(body.get("tools")),
            stream=stream,
            stream_usage=include_usage,
        )

    @staticmethod
    def _usage(usage: Usage) -> dict[str, int]:
        return {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens,
        }

    def body(self, request: LLMRequest, reply: Reply, usage: Usage, ids: Ids) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if reply.tool_calls else reply.text,
            "refusal": None,
            "annotations": [],
        }
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": ids.new("call_"),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json},
                }
                for call in reply.tool_calls
            ]
        return {
            "id": ids.new("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                }
            ],
            "usage": self._usage(usage),
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
        }

    def stream(self, request: LLMRequest, reply: Reply, usage: Usage, ids: Ids) -> Stream:
        head = self._chunk_head(request, ids)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            obj = {
                **head,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if request.stream_usage:
                obj["usage"] = None
            return b"data: " + dumps(obj) + b"\n\n"

        first = {"role": "assistant", "content": None if reply.tool_calls else "", "refusal": None}
        frames = [chunk(first)]
        for piece in split_text(reply.text) if not reply.tool_calls else []:
            frames.append(chunk({"content": piece}))
        for index, call in enumerate(reply.tool_calls):
            start = {
                "index": index,
                "id": ids.new("call_"),
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            frames.append(chunk({"tool_calls": [start]}))
            for piece in split_every(call.arguments_json):
                frames.append(
                    chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                )
        hang_after = min(2, len(frames))
        frames.append(chunk({}, "tool_calls" if reply.tool_calls else "stop"))
        if request.stream_usage:
            final = {**head, "choices": [], "usage": self._usage(usage)}
            frames.append(b"data: " + dumps(final) + b"\n\n")
        frames.append(b"data: [DONE]\n\n")
        return Stream(tuple(frames), hang_after)

    @staticmethod
    def _chunk_head(request: LLMRequest, ids: Ids) -> dict[str, Any]:
        return {
            "id": ids.new("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": request.model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
        }

    def error(
        self, status: int, message: str | None = None, param: str | None = None
    ) -> dict[str, Any]:
        if status == 429:
            kind, code = "requests", "rate_limit_exceeded"
        elif status >= 500:
            kind, code = "server_error", None
        else:
            kind, code = "invalid_request_error", None
        text = message or _MESSAGES.get(status, f"fakellm injected HTTP {status}.")
        return {"error": {"message": text, "type": kind, "param": param, "code": code}}

    def malformed(self, request: LLMRequest, ids: Ids) -> bytes:
        if request.stream:
            head = {**self._chunk_head(request, ids), "choices": []}
            return b"data: " + truncated(head) + b"\n\ndata: [DONE]\n\n"
        return truncated(self.body(request, Reply(text="malformed"), Usage(1, 1), ids))
