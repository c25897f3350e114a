"""OpenAI-compatible Chat Completions: `POST {base_url}/chat/completions`.

The neutral chat shape already is OpenAI's, so this mapping is nearly one to one.
"""

from __future__ import annotations

import json
from typing import Any

from beamline.envelope import ChatMessage, LLMRequestPayload, ToolCall, Usage
from services.gateway.providers import BadResponse, Completion, HttpRequest, need, token_count


def _message(msg: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": msg.role, "content": msg.content}
    if msg.role == "assistant" and msg.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in msg.tool_calls
        ]
    if msg.role == "tool":
        out["tool_call_id"] = msg.tool_call_id
        out["content"] = msg.content or ""
    elif msg.content is None and msg.role != "assistant":
        out["content"] = ""
    return out


def _tool_call(raw: Any, i: int) -> ToolCall:
    where = f"choices[0].message.tool_calls[{i}]"
    function = need(raw, "function", dict, where)
    arguments = function.get("arguments")
    if isinstance(arguments, dict):  # some compatible servers send an object
        arguments = json.dumps(arguments)
    return ToolCall(
        id=str(raw.get("id") or f"call_{i}"),
        name=need(function, "name", str, where + ".function"),
        arguments=arguments if isinstance(arguments, str) and arguments else "{}",
    )


class OpenAIWire:
    def build(self, request: LLMRequestPayload, api_key: str | None) -> HttpRequest:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [_message(m) for m in request.messages],
            "max_tokens": request.max_tokens,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    },
                }
                for t in request.tools
            ]
        if request.json_output:
            body["response_format"] = {"type": "json_object"}
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        return HttpRequest("/chat/completions", headers, body)

    def parse(self, body: Any, request: LLMRequestPayload) -> Completion:
        choices = need(body, "choices", list, "response")
        if not choices:
            raise BadResponse("response.choices: empty")
        raw = need(choices[0], "message", dict, "choices[0]")
        content = raw.get("content")
        if content is not None and not isinstance(content, str):
            raise BadResponse("choices[0].message.content: not text")
        raw_calls = raw.get("tool_calls") or []
        if not isinstance(raw_calls, list):
            raise BadResponse("choices[0].message.tool_calls: not a list")
        message = ChatMessage(
            role="assistant",
            content=content,
            tool_calls=tuple(_tool_call(c, i) for i, c in enumerate(raw_calls)),
        )
        usage = body.get("usage")
        finish = choices[0].get("finish_reason")
        model = body.get("model")
        return Completion(
            message=message,
            usage=Usage(
                input_tokens=token_count(usage, "prompt_tokens"),
                output_tokens=token_count(usage, "completion_tokens"),
            ),
            finish_reason=finish if isinstance(finish, str) else None,
            model=model if isinstance(model, str) and model else request.model,
        )
