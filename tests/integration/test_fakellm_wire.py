"""fakellm as a real process, driven by the official OpenAI and Anthropic SDKs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from beamline.process import Process
from beamline.testing import free_port, start_service, wait_for

pytestmark = pytest.mark.timeout(30)

SCRIPT = """
rules:
  - name: weather-tool
    match: {contains: weather, has_tools: true, last_role: user}
    respond:
      tool_calls:
        - {name: get_weather, arguments: {city: Paris, days: 2}}
  - name: weather-answer
    match: {tool_result_for: get_weather}
    respond: {text: "Forecast: {last_tool_result}"}
  - name: story
    match: {contains: "tell me a story"}
    respond: {text: "Once upon a time, a fake LLM streamed its answer word by word."}
  - name: rate-limited
    match: {model: m-429}
    fault: {status: 429, retry_after_s: 1}
  - name: server-error
    match: {model: m-500}
    fault: {status: 500}
  - name: hang
    match: {model: m-hang}
    fault: {hang: true}
  - name: hang-mid-stream
    match: {model: m-hang-mid}
    respond: {text: "one two three four five six"}
    fault: {hang_mid_stream: true}
  - name: malformed
    match: {model: m-malformed}
    fault: {malformed: true}
  - name: json
    match: {model: m-json}
    respond: {json: {answer: 42}}
  - name: loop
    match: {model: m-loop}
    respond:
      tool_calls: [{name: search_notes, arguments: {query: again}}]
  - name: twice
    match: {model: m-times}
    respond: {text: limited}
    times: 2
default:
  text: "echo: {last_user}"
"""

WEATHER_TOOL_OPENAI: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
WEATHER_TOOL_ANTHROPIC: Any = {
    "name": "get_weather",
    "description": "Weather forecast for a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@dataclass
class Fake:
    url: str
    process: Process

    def openai(self, timeout: float = 5.0) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key="test", max_retries=0, timeout=timeout
        )

    def anthropic(self, timeout: float = 5.0) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            base_url=self.url, api_key="test", max_retries=0, timeout=timeout
        )

    def calls(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/_fakellm/calls", timeout=5)
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result


def start_fake(tmp: Path, script: str) -> Fake:
    """A fakellm process on a free port, answering /healthz; killed by the caller."""
    (tmp / "script.yaml").write_text(script)
    port = free_port()
    env = {
        "BEAMLINE_FAKELLM_PORT": str(port),
        "BEAMLINE_FAKELLM_SCRIPT": str(tmp / "script.yaml"),
        "PYTHONUNBUFFERED": "1",
    }
    process = start_service("fakellm", env, tmp / "logs")
    fake = Fake(f"http://127.0.0.1:{port}", process)

    def up_or_dead() -> bool:
        if not process.alive():
            return True
        return httpx.get(f"{fake.url}/healthz", timeout=1).status_code == 200

    try:
        asyncio.run(wait_for(up_or_dead, timeout=15, what="fakellm /healthz"))
        assert process.alive(), f"fakellm exited: {process.logs()[-2000:]}"
    except BaseException:
        process.kill()
        raise
    return fake


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fake]:
    fake = start_fake(tmp_path_factory.mktemp("fakellm"), SCRIPT)
    try:
        yield fake
    finally:
        fake.process.kill()


@pytest.fixture
def fake(server: Fake) -> Fake:
    """The shared server with an empty call log and fresh rule counters."""
    httpx.post(f"{server.url}/_fakellm/reset", timeout=5).raise_for_status()
    assert server.process.alive(), server.process.logs()[-2000:]
    return server


USER: Any = [{"role": "user", "content": "hello there"}]


# -- OpenAI --------------------------------------------------------------------------------


def test_openai_text(fake: Fake) -> None:
    completion = fake.openai().chat.completions.create(model="gpt-4o-mini", messages=USER)
    choice = completion.choices[0]
    assert choice.message.content == "echo: hello there"
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3  # ceil(11 / 4)
    assert completion.usage.completion_tokens == 5  # ceil(17 / 4)
    assert completion.usage.total_tokens == 8


def test_openai_stream_text_with_usage(fake: Fake) -> None:
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Please tell me a story"},
    ]
    chunks = list(
        fake.openai().chat.completions.create(
            model="gpt-4o-mini",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Once upon a time, a fake LLM streamed its answer word by word."
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == 8  # ceil((9 + 22) / 4)
    assert usage.completion_tokens == 16  # ceil(63 / 4)


def test_openai_stream_without_include_usage_has_no_usage(fake: Fake) -> None:
    chunks = list(
        fake.openai().chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: hello there"
    assert all(c.usage is None and c.choices for c in chunks)


def test_openai_tool_call_then_tool_result(fake: Fake) -> None:
    client = fake.openai()
    messages: Any = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, tools=[WEATHER_TOOL_OPENAI]
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call: Any = choice.message.tool_calls[0]
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}

    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"})
    second = client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, tools=[WEATHER_TOOL_OPENAI]
    )
    assert second.choices[0].message.content == "Forecast: sunny, 24 C"
    assert second.choices[0].finish_reason == "stop"
    assert [c["rule"] for c in fake.calls()] == ["weather-tool", "weather-answer"]


def test_openai_stream_tool_call(fake: Fake) -> None:
    messages: Any = [{"role": "user", "content": "weather in Paris?"}]
    stream = fake.openai().chat.completions.create(
        model="gpt-4o-mini", messages=messages, tools=[WEATHER_TOOL_OPENAI], stream=True
    )
    ids, names, arguments, finish = set(), "", "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or []:
            assert part.index == 0
            if part.id:
                ids.add(part.id)
            if part.function and part.function.name:
                names += part.function.name
            if part.function and part.function.arguments:
                arguments += part.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert len(ids) == 1 and names == "get_weather"
    assert json.loads(arguments) == {"city": "Paris", "days": 2}
    assert finish == "tool_calls"


def test_openai_json_respond(fake: Fake) -> None:
    completion = fake.openai().chat.completions.create(model="m-json", messages=USER)
    assert json.loads(completion.choices[0].message.content or "") == {"answer": 42}


def test_tool_call_loop_repeats_with_unique_ids(fake: Fake) -> None:
    client = fake.openai()
    messages: Any = [{"role": "user", "content": "find it"}]
    seen = set()
    for _ in range(4):
        message = client.chat.completions.create(model="m-loop", messages=messages)
        message_obj = message.choices[0].message
        calls: Any = message_obj.tool_calls
        assert calls[0].function.name == "search_notes"
        assert json.loads(calls[0].function.arguments) == {"query": "again"}
        seen.add(calls[0].id)
        messages.append(message_obj.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": calls[0].id, "content": "nothing"})
    assert len(seen) == 4
    assert [c["rule"] for c in fake.calls()] == ["loop"] * 4


def test_times_falls_through_to_the_default(fake: Fake) -> None:
    client = fake.openai()
    answers = [
        client.chat.completions.create(model="m-times", messages=USER).choices[0].message.content
        for _ in range(3)
    ]
    assert answers == ["limited", "limited", "echo: hello there"]
    assert [c["rule"] for c in fake.calls()] == ["twice", "twice", None]


# -- Anthropic -----------------------------------------------------------------------------


def test_anthropic_text(fake: Fake) -> None:
    message = fake.anthropic().messages.create(
        model="claude-x", max_tokens=100, system="Be brief.", messages=USER
    )
    assert message.type == "message" and message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "echo: hello there"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 5  # ceil((9 + 11) / 4)
    assert message.usage.output_tokens == 5


def test_anthropic_stream_text(fake: Fake) -> None:
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "tell me a story"}]}]
    with fake.anthropic().messages.stream(
        model="claude-x", max_tokens=100, messages=messages
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    expected = "Once upon a time, a fake LLM streamed its answer word by word."
    assert "".join(pieces) == expected and len(pieces) > 5
    assert final.content[0].text == expected  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 16


def test_anthropic_raw_event_sequence(fake: Fake) -> None:
    events = list(
        fake.anthropic().messages.create(
            model="claude-x", max_tokens=100, messages=USER, stream=True
        )
    )
    kinds = [event.type for event in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-4:] == [
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert set(kinds) == {
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    }


def test_anthropic_tool_use_then_tool_result(fake: Fake) -> None:
    client = fake.anthropic()
    messages: Any = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.messages.create(
        model="claude-x", max_tokens=100, messages=messages, tools=[WEATHER_TOOL_ANTHROPIC]
    )
    assert first.stop_reason == "tool_use"
    block: Any = first.content[0]
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.id.startswith("toolu_")
    assert block.input == {"city": "Paris", "days": 2}

    messages.append({"role": "assistant", "content": [b.model_dump() for b in first.content]})
    messages.append(
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "rain"}],
        }
    )
    second = client.messages.create(
        model="claude-x", max_tokens=100, messages=messages, tools=[WEATHER_TOOL_ANTHROPIC]
    )
    assert second.content[0].text == "Forecast: rain"  # type: ignore[union-attr]
    assert [c["rule"] for c in fake.calls()] == ["weather-tool", "weather-answer"]


def test_anthropic_stream_tool_use(fake: Fake) -> None:
    messages: Any = [{"role": "user", "content": "weather?"}]
    with fake.anthropic().messages.stream(
        model="claude-x", max_tokens=100, messages=messages, tools=[WEATHER_TOOL_ANTHROPIC]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "content_block_delta" in kinds
    block: Any = final.content[0]
    assert block.type == "tool_use" and block.input == {"city": "Paris", "days": 2}
    assert final.stop_reason == "tool_use"


def test_models_list_in_both_formats(fake: Fake) -> None:
    assert "m-429" in [m.id for m in fake.openai().models.list()]
    assert "m-429" in [m.id for m in fake.anthropic().models.list()]


# -- faults --------------------------------------------------------------------------------


def test_429_with_retry_after(fake: Fake) -> None:
    with pytest.raises(openai.RateLimitError) as oai:
        fake.openai().chat.completions.create(model="m-429", messages=USER)
    assert oai.value.response.headers["retry-after"] == "1"
    assert oai.value.code == "rate_limit_exceeded"
    with pytest.raises(anthropic.RateLimitError) as ant:
        fake.anthropic().messages.create(model="m-429", max_tokens=10, messages=USER)
    assert ant.value.response.headers["retry-after"] == "1"
    assert ant.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": ant.value.body["error"]["message"]},  # type: ignore[index]
    }


def test_500(fake: Fake) -> None:
    with pytest.raises(openai.InternalServerError):
        fake.openai().chat.completions.create(model="m-500", messages=USER)
    with pytest.raises(anthropic.InternalServerError) as ant:
        fake.anthropic().messages.create(model="m-500", max_tokens=10, messages=USER)
    assert ant.value.status_code == 500
    assert [c["status"] for c in fake.calls()] == [500, 500]


def test_hang_times_out_without_blocking_the_server(fake: Fake) -> None:
    with pytest.raises(openai.APITimeoutError):
        fake.openai(timeout=1).chat.completions.create(model="m-hang", messages=USER)
    answer = fake.openai(timeout=2).chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert answer.choices[0].message.content == "echo: hello there"
    with pytest.raises(anthropic.APITimeoutError):
        fake.anthropic(timeout=1).messages.create(model="m-hang", max_tokens=10, messages=USER)
    calls = fake.calls()
    assert [(c["rule"], c["status"]) for c in calls] == [
        ("hang", None),
        (None, 200),
        ("hang", None),
    ]


def test_hang_mid_stream_sends_a_little_then_times_out(fake: Fake) -> None:
    received: list[str] = []
    stream: Any = fake.openai(timeout=1).chat.completions.create(
        model="m-hang-mid", messages=USER, stream=True
    )
    with pytest.raises((openai.APITimeoutError, httpx2.ReadTimeout)):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "one "

    events: list[str] = []
    events_stream: Any = fake.anthropic(timeout=1).messages.create(
        model="m-hang-mid", max_tokens=10, messages=USER, stream=True
    )
    with pytest.raises((anthropic.APITimeoutError, httpx2.ReadTimeout)):
        for event in events_stream:
            events.append(event.type)
    assert events[0] == "message_start" and "content_block_delta" in events
    assert "message_stop" not in events


def test_malformed_bodies_fail_to_decode(fake: Fake) -> None:
    with pytest.raises((json.JSONDecodeError, openai.APIResponseValidationError)):
        fake.openai().chat.completions.create(model="m-malformed", messages=USER)
    with pytest.raises((json.JSONDecodeError, openai.APIResponseValidationError)):
        for _ in fake.openai().chat.completions.create(
            model="m-malformed", messages=USER, stream=True
        ):
            pass
    with pytest.raises((json.JSONDecodeError, anthropic.APIResponseValidationError)):
        fake.anthropic().messages.create(model="m-malformed", max_tokens=10, messages=USER)
    raw = httpx.post(
        f"{fake.url}/v1/chat/completions", json={"model": "m-malformed", "messages": USER}
    )
    assert raw.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw.text)


# -- the control endpoints -----------------------------------------------------------------


def test_calls_records_each_call_once_and_reset_clears(fake: Fake) -> None:
    fake.openai().chat.completions.create(model="gpt-4o-mini", messages=USER)
    fake.anthropic().messages.create(model="claude-x", max_tokens=10, messages=USER, stream=True)
    calls = fake.calls()
    assert [(c["seq"], c["endpoint"], c["model"], c["rule"]) for c in calls] == [
        (1, "/v1/chat/completions", "gpt-4o-mini", None),
        (2, "/v1/messages", "claude-x", None),
    ]
    assert calls[0]["body"]["messages"] == USER
    assert calls[1]["body"]["stream"] is True and calls[1]["stream"] is True
    assert calls[0]["ts"] <= calls[1]["ts"]
    assert calls[0]["reply"] == {"text": "echo: hello there", "tool_calls": []}
    assert len(httpx.get(f"{fake.url}/_fakellm/calls", params={"since": 1}).json()) == 1
    httpx.post(f"{fake.url}/_fakellm/reset").raise_for_status()
    assert fake.calls() == []


def test_put_script_replaces_and_validates(fake: Fake) -> None:
    bad = httpx.put(f"{fake.url}/_fakellm/script", content="rules: [{respond: {text: a, json: 1}}]")
    assert bad.status_code == 400
    assert "rules[0].respond" in bad.json()["error"]
    assert "unknown key" in httpx.put(f"{fake.url}/_fakellm/script", content="rulez: []").text
    try:
        good = httpx.put(f"{fake.url}/_fakellm/script", content="default: {text: replaced}")
        assert good.status_code == 200
        answer = fake.openai().chat.completions.create(model="m-429", messages=USER)
        assert answer.choices[0].message.content == "replaced"
    finally:
        httpx.put(f"{fake.url}/_fakellm/script", content=SCRIPT).raise_for_status()
    assert httpx.get(f"{fake.url}/_fakellm/script").json()["rules"][0]["name"] == "weather-tool"


def test_bad_request_bodies_get_the_provider_error_format(fake: Fake) -> None:
    oai = httpx.post(f"{fake.url}/v1/chat/completions", content=b"{not json")
    assert oai.status_code == 400
    assert oai.json()["error"]["type"] == "invalid_request_error"
    assert set(oai.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.post(f"{fake.url}/v1/chat/completions", json={"model": "m"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    no_model = httpx.post(f"{fake.url}/v1/chat/completions", json={"messages": USER})
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"

    ant = httpx.post(f"{fake.url}/v1/messages", content=b"nope")
    assert ant.status_code == 400
    assert ant.json()["type"] == "error"
    assert ant.json()["error"]["type"] == "invalid_request_error"
    no_messages = httpx.post(f"{fake.url}/v1/messages", json={"model": "m", "max_tokens": 5})
    assert no_messages.status_code == 400 and "messages" in no_messages.json()["error"]["message"]

    with pytest.raises(openai.BadRequestError):  # a tool result nobody asked for
        fake.openai().chat.completions.create(
            model="m",
            messages=[*USER, {"role": "tool", "tool_call_id": "call_x", "content": "?"}],
        )
    with pytest.raises(anthropic.BadRequestError):  # a tool_use left without its result
        fake.anthropic().messages.create(
            model="m",
            max_tokens=5,
            messages=[
                *USER,
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "x", "input": {}}],
                },
                {"role": "user", "content": "and?"},
            ],
        )
    assert [c["status"] for c in fake.calls()] == [400] * 7
    assert httpx.get(f"{fake.url}/v1/nothing").json()["error"]["message"].startswith("fakellm")
