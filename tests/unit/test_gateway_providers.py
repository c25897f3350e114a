"""Gateway wire formats: neutral (OpenAI-shaped) requests to each provider and back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from beamline.envelope import ChatMessage, LLMRequestPayload, ToolCall, ToolSpec
from services.gateway.anthropic_provider import AnthropicWire
from services.gateway.openai_provider import OpenAIWire
from services.gateway.providers import BadResponse, error_text, wire_for

WEATHER = ToolSpec(
    name="weather",
    description="Weather for a city.",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
)
CALL_A = ToolCall(id="call_a", name="weather", arguments='{"city": "Oslo"}')
CALL_B = ToolCall(id="call_b", name="weather", arguments='{"city": "Rome"}')


def conversation(**kw: Any) -> LLMRequestPayload:
    return LLMRequestPayload(
        provider="p",
        model="m-1",
        messages=(
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Weather in Oslo and Rome?"),
            ChatMessage(role="assistant", content=None, tool_calls=(CALL_A, CALL_B)),
            ChatMessage(role="tool", content="-3C", tool_call_id="call_a"),
            ChatMessage(role="tool", content="18C", tool_call_id="call_b"),
        ),
        tools=(WEATHER,),
        **kw,
    )


# --- OpenAI-compatible ------------------------------------------------------------------


def test_openai_request_keeps_the_neutral_shape_and_bearer_auth() -> None:
    http = OpenAIWire().build(conversation(temperature=0.2), "sk-test-key")
    assert http.path == "/chat/completions"
    assert http.headers["authorization"] == "Bearer sk-test-key"
    body = http.body
    assert body["model"] == "m-1" and body["max_tokens"] == 1024 and body["temperature"] == 0.2
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool", "tool"]
    assistant = body["messages"][2]
    assert assistant["tool_calls"][1] == {
        "id": "call_b",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Rome"}'},
    }
    assert body["messages"][3] == {"role": "tool", "tool_call_id": "call_a", "content": "-3C"}
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Weather for a city.",
                "parameters": WEATHER.parameters,
            },
        }
    ]
    assert "response_format" not in body


def test_openai_json_output_asks_for_a_json_object_and_no_key_means_no_auth() -> None:
    http = OpenAIWire().build(conversation(json_output=True), None)
    assert http.body["response_format"] == {"type": "json_object"}
    assert "authorization" not in http.headers


def test_openai_response_with_text_and_usage() -> None:
    body = {
        "model": "m-1-2026",
        "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
    done = OpenAIWire().parse(body, conversation())
    assert done.message == ChatMessage(role="assistant", content="hi")
    assert (done.usage.input_tokens, done.usage.output_tokens) == (12, 3)
    assert done.finish_reason == "stop" and done.model == "m-1-2026"


def test_openai_response_with_tool_calls() -> None:
    body = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_9",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
    }
    done = OpenAIWire().parse(body, conversation())
    assert done.message.tool_calls == (
        ToolCall(id="call_9", name="weather", arguments='{"city":"Oslo"}'),
    )
    assert done.message.content is None and done.finish_reason == "tool_calls"
    assert done.usage.total == 0 and done.model == "m-1"  # absent usage and model: defaults


@pytest.mark.parametrize(
    "body",
    [[], {}, {"choices": []}, {"choices": [{}]}, {"choices": [{"message": {"content": 5}}]}],
)
def test_openai_unreadable_bodies_are_bad_responses(body: Any) -> None:
    with pytest.raises(BadResponse):
        OpenAIWire().parse(body, conversation())


# --- Anthropic ----------------------------------------------------------------------------


def test_anthropic_request_moves_system_out_and_maps_tool_calls_and_results() -> None:
    http = AnthropicWire().build(conversation(), "sk-ant-key")
    assert http.path == "/messages"
    assert http.headers["x-api-key"] == "sk-ant-key"
    assert http.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in http.headers
    body = http.body
    assert body["system"] == "Be brief."
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo and Rome?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "call_a", "name": "weather", "input": {"city": "Oslo"}},
                {"type": "tool_use", "id": "call_b", "name": "weather", "input": {"city": "Rome"}},
            ],
        },
        {  # consecutive tool results merged into one user turn
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_a", "content": "-3C"},
                {"type": "tool_result", "tool_use_id": "call_b", "content": "18C"},
            ],
        },
    ]
    assert body["tools"] == [
        {
            "name": "weather",
            "description": "Weather for a city.",
            "input_schema": WEATHER.parameters,
        }
    ]


def test_anthropic_user_text_after_tool_results_joins_the_same_user_turn() -> None:
    request = conversation()
    request = request.model_copy(
        update={"messages": (*request.messages, ChatMessage(role="user", content="And Paris?"))}
    )
    last = AnthropicWire().build(request, None).body["messages"][-1]
    assert last["role"] == "user"
    assert [b["type"] for b in last["content"]] == ["tool_result", "tool_result", "text"]


def test_anthropic_json_output_is_asked_for_in_the_system_prompt() -> None:
    body = AnthropicWire().build(conversation(json_output=True), None).body
    assert body["system"].startswith("Be brief.") and "JSON object" in body["system"]


def test_anthropic_unparseable_tool_arguments_are_kept_not_fatal() -> None:
    bad = ToolCall(id="c", name="weather", arguments="{oops")
    request = LLMRequestPayload(
        provider="p",
        model="m",
        messages=(
            ChatMessage(role="user", content="q"),
            ChatMessage(role="assistant", tool_calls=(bad,)),
        ),
    )
    block = AnthropicWire().build(request, None).body["messages"][1]["content"][0]
    assert block["input"] == {"_raw_arguments": "{oops"}


def test_anthropic_response_with_text_tool_use_and_usage() -> None:
    body = {
        "model": "claude-x",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 20, "output_tokens": 7},
    }
    done = AnthropicWire().parse(body, conversation())
    assert done.message.content == "Checking."
    assert done.message.tool_calls[0].id == "toolu_1"
    assert json.loads(done.message.tool_calls[0].arguments) == {"city": "Oslo"}
    assert done.finish_reason == "tool_calls"
    assert (done.usage.input_tokens, done.usage.output_tokens) == (20, 7)
    assert done.model == "claude-x"


def test_anthropic_stop_reasons_use_openai_vocabulary() -> None:
    for stop, finish in [("end_turn", "stop"), ("max_tokens", "length"), ("other", "other")]:
        body = {"content": [{"type": "text", "text": "x"}], "stop_reason": stop}
        assert AnthropicWire().parse(body, conversation()).finish_reason == finish


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"content": "text"},
        {"content": [{"text": "no type"}]},
        {"content": [{"type": "tool_use", "id": "x", "name": "y", "input": "not an object"}]},
    ],
)
def test_anthropic_unreadable_bodies_are_bad_responses(body: Any) -> None:
    with pytest.raises(BadResponse):
        AnthropicWire().parse(body, conversation())


# --- shared ---------------------------------------------------------------------------------


def test_provider_error_messages_are_found_in_both_formats() -> None:
    assert error_text({"error": {"message": "bad model"}}, "") == "bad model"
    anthropic = {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}}
    assert error_text(anthropic, "") == "no"
    assert error_text(None, " plain text ") == "plain text"
    assert error_text(None, "") == "(empty body)"


def test_wire_for_each_provider_kind() -> None:
    assert isinstance(wire_for("openai"), OpenAIWire)
    assert isinstance(wire_for("anthropic"), AnthropicWire)
