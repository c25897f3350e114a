"""The gateway as a real process between a real nats-server and a real fakellm over HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from beamline import bus, subjects
from beamline.envelope import (
    ChatMessage,
    Envelope,
    ErrorPayload,
    EventPayload,
    Kind,
    LLMRequestPayload,
    LLMResponsePayload,
    TaskPayload,
    ToolCall,
    ToolSpec,
)
from beamline.process import Process
from beamline.testing import NatsServer, free_port, mesh_env, start_service, wait_for

pytestmark = pytest.mark.timeout(60)

SENTINEL = "sk-SENTINEL-123"
REPLY_MAX = 4 * 1024 * 1024
WEATHER = ToolSpec(
    name="weather",
    description="Weather for a city.",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
)
SCRIPT: dict[str, Any] = {
    "rules": [
        {
            "name": "weather-answer",
            "match": {"tool_result_for": "weather"},
            "respond": {"text": "It is {last_tool_result} there."},
        },
        {
            "name": "weather-call",
            "match": {"contains": "weather"},
            "respond": {"tool_calls": [{"name": "weather", "arguments": {"city": "Oslo"}}]},
        },
    ],
    "default": {"text": "echo: {last_user}"},
}


class Mesh:
    """fakellm and the gateway as processes, plus what tests need to talk to them."""

    def __init__(self, tmp_path: Path, nats: NatsServer, nc: NATS) -> None:
        self.tmp_path, self.nats, self.nc = tmp_path, nats, nc
        self.fake_url = ""
        self.gateway: Process | None = None
        self.processes: list[Process] = []

    async def start(
        self,
        rules: list[dict[str, Any]] | None = None,
        providers: dict[str, dict[str, Any]] | None = None,
        agents: list[dict[str, Any]] | None = None,
        **env: Any,
    ) -> None:
        port = free_port()
        self.fake_url = f"http://127.0.0.1:{port}"
        script = self.tmp_path / "script.yaml"
        script.write_text(yaml.safe_dump({**SCRIPT, "rules": (rules or []) + SCRIPT["rules"]}))
        fake_env = {
            "BEAMLINE_FAKELLM_HOST": "127.0.0.1",
            "BEAMLINE_FAKELLM_PORT": str(port),
            "BEAMLINE_FAKELLM_SCRIPT": str(script),
        }
        logs = self.tmp_path / "logs"
        self.processes.append(start_service("fakellm", fake_env, logs))
        deploy = self.tmp_path / "deploy.yaml"
        declared = {"version": 1, "providers": self._providers(providers), "agents": agents or []}
        deploy.write_text(yaml.safe_dump(declared))
        gw_env = mesh_env(
            self.nats.url,
            self.tmp_path / "data",
            BEAMLINE_CONFIG=deploy,
            FAKE_API_KEY=SENTINEL,
            BEAMLINE_GATEWAY_BACKOFF_BASE_S=0.01,
            BEAMLINE_GATEWAY_BACKOFF_CAP_S=0.05,
            **env,
        )
        self.gateway = start_service("gateway", gw_env, logs)
        self.processes.append(self.gateway)
        await wait_for(self._fake_healthy, timeout=20, what="fakellm /healthz")
        await wait_for(self.health, timeout=20, what="gateway health")

    def _providers(self, overrides: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
        base = {"base_url": f"{self.fake_url}/v1", "api_key_env": "FAKE_API_KEY"}
        providers: dict[str, dict[str, Any]] = {
            "fake": {"kind": "openai", **base},
            "claude": {"kind": "anthropic", **base},
        }
        for name, values in (overrides or {}).items():
            providers[name] = {**providers.get(name, {"kind": "openai", **base}), **values}
        return providers

    async def _fake_healthy(self) -> bool:
        assert self.gateway is None or self.gateway.alive(), self.gateway.logs()
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{self.fake_url}/healthz", timeout=1)).status_code == 200

    async def health(self) -> dict[str, Any]:
        assert self.gateway is not None
        assert self.gateway.alive(), self.gateway.logs()[-3000:]
        msg = await self.nc.request(subjects.health("gateway"), b"", timeout=0.5)
        body: dict[str, Any] = json.loads(msg.data)
        return body

    async def calls(self, model: str | None = None) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as client:
            calls: list[dict[str, Any]] = (
                await client.get(f"{self.fake_url}/_fakellm/calls")
            ).json()
        return [c for c in calls if model is None or c["model"] == model]

    async def raw_request(self, subject: str, data: bytes, timeout: float = 10) -> Msg:
        return await self.nc.request(subject, data, timeout=timeout)

    async def ask(self, env: Envelope, timeout: float = 10) -> Envelope:
        provider = env.payload.provider  # type: ignore[union-attr]
        msg = await self.nc.request(
            subjects.llm(provider), bus.encode(env), timeout=timeout, headers=bus.headers_for(env)
        )
        return bus.decode(msg.data, REPLY_MAX)

    async def stream(self, stream: str) -> list[tuple[dict[str, str], bytes]]:
        """Every message in a stream: (headers, data)."""
        js = self.nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            out.append((dict(msg.headers or {}), msg.data or b""))
        return out

    async def events(self, name: str | None = None) -> list[Envelope]:
        found = [Envelope.model_validate_json(d) for _, d in await self.stream("BL_EVENTS")]
        return [e for e in found if name is None or getattr(e.payload, "name", "") == name]

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop(5)


@pytest.fixture
async def mesh(tmp_path: Path, nats_server: NatsServer, nc: NATS) -> AsyncIterator[Mesh]:
    handle = Mesh(tmp_path, nats_server, nc)
    try:
        yield handle
    finally:
        handle.stop()


def llm_request(
    provider: str,
    text: str,
    model: str = "m-test",
    history: tuple[ChatMessage, ...] = (),
    **kw: Any,
) -> Envelope:
    messages = (
        ChatMessage(role="system", content="You are terse."),
        ChatMessage(role="user", content=text),
        *history,
    )
    payload = LLMRequestPayload(
        provider=provider, model=model, messages=messages, tools=(WEATHER,), **kw
    )
    return Envelope(
        kind=Kind.LLM_REQUEST,
        sender="agent-7",
        recipient="gateway",
        conversation_id="conv-1",
        payload=payload,
    )


def response_of(env: Envelope) -> LLMResponsePayload:
    assert isinstance(env.payload, LLMResponsePayload), env.payload
    return env.payload


def error_of(env: Envelope) -> ErrorPayload:
    assert isinstance(env.payload, ErrorPayload), env.payload
    return env.payload


# --- both wire formats ---------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["fake", "claude"])
async def test_a_provider_answers_text_tool_calls_and_tool_results_with_usage(
    mesh: Mesh, provider: str
) -> None:
    await mesh.start()

    request = llm_request(provider, "hello there")
    text = await mesh.ask(request)
    answer = response_of(text)
    assert answer.message.content == "echo: hello there"
    assert answer.request_id == request.id and answer.provider == provider
    assert answer.attempts == 1 and answer.finish_reason == "stop"
    assert text.usage is not None and text.usage.input_tokens > 0 and text.usage.output_tokens > 0
    assert text.trace_id == request.trace_id and text.parent_span_id == request.span_id

    call = response_of(await mesh.ask(llm_request(provider, "weather in Oslo?")))
    assert call.finish_reason == "tool_calls"
    (tool_call,) = call.message.tool_calls
    assert tool_call.name == "weather" and json.loads(tool_call.arguments) == {"city": "Oslo"}

    history = (
        ChatMessage(role="assistant", tool_calls=(ToolCall(id=tool_call.id, name="weather"),)),
        ChatMessage(role="tool", content="-3C", tool_call_id=tool_call.id),
    )
    final = response_of(await mesh.ask(llm_request(provider, "weather in Oslo?", history=history)))
    assert final.message.content == "It is -3C there."

    calls = await mesh.calls()
    assert [c["status"] for c in calls] == [200, 200, 200]
    sent = calls[2]["body"]
    if provider == "claude":
        assert calls[2]["endpoint"] == "/v1/messages"
        assert sent["system"] == "You are terse."
        assert sent["messages"][-1]["content"][0]["type"] == "tool_result"
    else:
        assert calls[2]["endpoint"] == "/v1/chat/completions"
        assert sent["messages"][-1] == {
            "role": "tool",
            "tool_call_id": tool_call.id,
            "content": "-3C",
        }
    completed = await wait_for(
        lambda: _at_least(mesh.events("llm_call_completed"), 3), what="3 completed events"
    )
    data = completed[0].payload.data
    assert data["provider"] == provider and data["input_tokens"] > 0 and data["attempts"] == 1


async def _at_least(events: Coroutine[Any, Any, list[Envelope]], n: int) -> list[Envelope]:
    found = await events
    return found if len(found) >= n else []


# --- retries, timeouts, the breaker --------------------------------------------------------


async def test_a_429_with_retry_after_is_retried_once_and_the_breaker_stays_closed(
    mesh: Mesh,
) -> None:
    rule = {
        "name": "throttle-once",
        "match": {"model": "m-429"},
        "fault": {"status": 429, "retry_after_s": 0.4},
        "times": 1,
    }
    await mesh.start([rule], {"fake": {"max_attempts": 3, "breaker_fail_max": 1}})
    started = time.monotonic()
    answer = response_of(await mesh.ask(llm_request("fake", "hi", model="m-429")))
    assert answer.attempts == 2 and answer.message.content == "echo: hi"
    assert time.monotonic() - started >= 0.4  # the Retry-After was honoured
    assert [c["status"] for c in await mesh.calls("m-429")] == [429, 200]
    health = await mesh.health()
    assert health["providers"]["fake"]["breaker"] == "closed"


async def test_repeated_server_errors_end_as_provider_error_after_max_attempts(
    mesh: Mesh,
) -> None:
    rule = {"name": "down", "match": {"model": "m-500"}, "fault": {"status": 500}}
    await mesh.start([rule], {"fake": {"max_attempts": 3, "breaker_fail_max": 10}})
    error = error_of(await mesh.ask(llm_request("fake", "hi", model="m-500")))
    assert error.reason == "provider_error"
    assert "HTTP 500" in error.message and "after 3 attempts" in error.message
    assert len(await mesh.calls("m-500")) == 3
    (failed,) = await wait_for(lambda: mesh.events("llm_call_failed"), what="failed event")
    assert failed.payload.data["reason"] == "provider_error"
    assert failed.payload.data["attempts"] == 3


async def test_a_refused_request_is_provider_rejected_at_once_and_the_breaker_stays_closed(
    mesh: Mesh,
) -> None:
    rule = {
        "name": "refuse",
        "match": {"model": "m-400"},
        "fault": {"status": 400, "message": "max_tokens is too large for this model"},
    }
    await mesh.start([rule], {"fake": {"max_attempts": 3, "breaker_fail_max": 1}})
    for _ in range(2):  # twice: with breaker_fail_max 1, a counted failure would open it
        error = error_of(await mesh.ask(llm_request("fake", "hi", model="m-400")))
        assert error.reason == "provider_rejected"
        assert "HTTP 400" in error.message and "max_tokens is too large" in error.message
    assert len(await mesh.calls("m-400")) == 2  # one call each: not retried
    assert (await mesh.health())["providers"]["fake"]["breaker"] == "closed"


async def test_a_hanging_provider_times_out_opens_the_breaker_and_is_then_not_called(
    mesh: Mesh,
) -> None:
    rule = {"name": "hang", "match": {"model": "m-hang"}, "fault": {"hang": True}}
    config = {"timeout_s": 0.3, "max_attempts": 1, "breaker_fail_max": 2, "breaker_reset_s": 60}
    await mesh.start([rule], {"fake": config})
    first = error_of(await mesh.ask(llm_request("fake", "hi", model="m-hang")))
    assert first.reason == "provider_timeout" and "read timeout" in first.message
    # the second timeout trips the breaker: the reply says so (the cause stays in the text)
    second = error_of(await mesh.ask(llm_request("fake", "hi", model="m-hang")))
    assert second.reason == "circuit_open" and "read timeout" in second.message

    (opened,) = await wait_for(lambda: mesh.events("breaker_opened"), what="breaker_opened")
    assert opened.payload.data["provider"] == "fake"
    assert opened.payload.data["from"] == "closed" and opened.payload.data["to"] == "open"
    assert "timeout" in opened.payload.data["reason"]

    refused = error_of(await mesh.ask(llm_request("fake", "hi", model="m-hang")))
    assert refused.reason == "circuit_open" and "is open" in refused.message
    assert len(await mesh.calls("m-hang")) == 2
    health = await mesh.health()
    assert health["providers"]["fake"]["breaker"] == "open"
    assert health["providers"]["claude"]["breaker"] == "closed"  # one breaker per provider


async def test_a_provider_hanging_mid_body_is_cut_off_by_the_read_timeout_and_counts_as_failure(
    mesh: Mesh,
) -> None:
    """fakellm sends the status line, the headers and half the body, then nothing: httpx
    raises ReadTimeout while reading the body, which the breaker counts as a failure."""
    rule = {"name": "stall", "match": {"model": "m-stall"}, "fault": {"hang_mid_stream": True}}
    config = {"timeout_s": 0.4, "max_attempts": 1, "breaker_fail_max": 2, "breaker_reset_s": 60}
    await mesh.start([rule], {"fake": config})
    started = time.monotonic()
    first = error_of(await mesh.ask(llm_request("fake", "hi", model="m-stall")))
    assert first.reason == "provider_timeout" and "read timeout" in first.message
    assert time.monotonic() - started < 3.0  # cut off, not left hanging
    assert (await mesh.health())["providers"]["fake"]["consecutive_failures"] == 1
    second = error_of(await mesh.ask(llm_request("fake", "hi", model="m-stall")))
    assert second.reason == "circuit_open"
    calls = await mesh.calls("m-stall")
    assert [c["fault"] for c in calls] == ["hang_mid_stream", "hang_mid_stream"]
    assert (await mesh.health())["providers"]["fake"]["breaker"] == "open"
    (record,) = await wait_for(lambda: _breaker_records(mesh, "fake", "open"), what="record")
    assert "read timeout" in (record["last_error"] or "")


async def _breaker_records(mesh: Mesh, provider: str, state: str) -> list[dict[str, Any]]:
    kv = await mesh.nc.jetstream().key_value(subjects.BUCKET_BREAKERS)
    try:
        record: dict[str, Any] = json.loads((await kv.get(provider)).value or b"{}")
    except Exception:
        return []
    return [record] if record.get("state") == state else []


async def test_an_open_breaker_half_opens_on_its_own_and_a_good_trial_closes_it(
    mesh: Mesh,
) -> None:
    """No call needs to arrive for the breaker to half-open (agents have moved away); the
    states land in BL_BREAKERS for agent hosts, in order."""
    rule = {"name": "down", "match": {"model": "m-down"}, "fault": {"status": 503}, "times": 1}
    config = {"max_attempts": 1, "breaker_fail_max": 1, "breaker_reset_s": 0.5}
    await mesh.start([rule], {"fake": config})
    assert (await _breaker_records(mesh, "fake", "closed"))[0]["gateway"]  # written at start
    tripped = error_of(await mesh.ask(llm_request("fake", "hi", model="m-down")))
    assert tripped.reason == "circuit_open" and "HTTP 503" in tripped.message
    await wait_for(lambda: _breaker_records(mesh, "fake", "half_open"), what="half-open")
    assert len(await mesh.calls("m-down")) == 1  # half-opened without a call
    answer = response_of(await mesh.ask(llm_request("fake", "hi again", model="m-down")))
    assert answer.message.content == "echo: hi again"  # the trial
    await wait_for(lambda: _breaker_records(mesh, "fake", "closed"), what="closed again")
    names = [
        e.payload.data.get("to")
        for e in await mesh.events()
        if isinstance(e.payload, EventPayload) and e.payload.name.startswith("breaker_")
    ]
    assert names == ["open", "half-open", "closed"]


async def test_an_open_breaker_answers_before_any_budget_reservation(mesh: Mesh) -> None:
    """A paused agent's probe learns `circuit_open` (keep waiting, no retry spent) even when
    the budget service is down too; and no reservation is held for a call never made."""
    rule = {"name": "down", "match": {"model": "m-down"}, "fault": {"status": 503}}
    config = {"max_attempts": 1, "breaker_fail_max": 1, "breaker_reset_s": 60}
    spender = {
        "name": "spender",
        "role": "spend",
        "models": [{"provider": "fake", "model": "m-down", "context_window": 128000}],
        "budget": {"tokens": 100000},
    }
    await mesh.start([rule], {"fake": config}, agents=[spender])
    tripped = error_of(await mesh.ask(llm_request("fake", "hi", model="m-down")))
    assert tripped.reason == "circuit_open"  # agent-7 has no budget: no reservation needed

    # spender's calls are budgeted, and no budget service runs
    probe = llm_request("fake", "hi again", model="m-down").model_copy(update={"sender": "spender"})
    refused = error_of(await mesh.ask(probe))
    assert refused.reason == "circuit_open" and "is open" in refused.message
    assert len(await mesh.calls("m-down")) == 1


async def test_a_429_retry_after_throttles_the_provider_for_every_request_not_the_breaker(
    mesh: Mesh,
) -> None:
    rule = {
        "name": "throttle-once",
        "match": {"model": "m-429"},
        "fault": {"status": 429, "retry_after_s": 1.0},
        "times": 1,
    }
    await mesh.start([rule], {"fake": {"max_attempts": 3, "breaker_fail_max": 1}})
    first = asyncio.create_task(mesh.ask(llm_request("fake", "one", model="m-429")))
    await wait_for(lambda: mesh.calls("m-429"), what="the 429")
    # a second request during the pause waits for it too instead of meeting another 429
    second = await mesh.ask(llm_request("fake", "two", model="m-429"))
    assert response_of(second).message.content == "echo: two"
    assert response_of(await first).message.content == "echo: one"
    calls = await mesh.calls("m-429")
    assert [c["status"] for c in calls] == [429, 200, 200]
    assert min(c["ts"] for c in calls[1:]) - calls[0]["ts"] >= 0.95
    health = (await mesh.health())["providers"]["fake"]
    assert health["breaker"] == "closed" and health["consecutive_failures"] == 0
    assert health["throttled"] >= 1
    assert await mesh.events("breaker_opened") == []


async def test_the_gateway_deadline_answers_before_a_slow_provider_does(mesh: Mesh) -> None:
    rule = {"name": "hang", "match": {"model": "m-slow"}, "fault": {"hang": True}}
    await mesh.start([rule], {"fake": {"timeout_s": 30}}, BEAMLINE_GATEWAY_DEADLINE_S=0.5)
    started = time.monotonic()
    error = error_of(await mesh.ask(llm_request("fake", "hi", model="m-slow"), timeout=5))
    assert error.reason == "provider_timeout"
    assert time.monotonic() - started < 3.0  # the provider's 30 s read timeout did not apply


async def test_a_malformed_body_is_a_bad_response(mesh: Mesh) -> None:
    rule = {"name": "broken", "match": {"model": "m-bad"}, "fault": {"malformed": True}}
    await mesh.start([rule])
    for provider in ("fake", "claude"):
        error = error_of(await mesh.ask(llm_request(provider, "hi", model="m-bad")))
        assert error.reason == "provider_bad_response", error.message
    assert len(await mesh.calls("m-bad")) == 2  # not retried


# --- idempotency ---------------------------------------------------------------------------


async def test_the_same_request_id_makes_one_provider_call_and_identical_replies(
    mesh: Mesh,
) -> None:
    rule = {"name": "slow", "match": {"model": "m-slow"}, "fault": {"latency_ms": 500}}
    await mesh.start([rule])

    request = llm_request("fake", "once", model="m-once")
    data = bus.encode(request)
    first = await mesh.raw_request("bl.llm.fake", data)
    again = await mesh.raw_request("bl.llm.fake", data)
    assert first.data == again.data
    assert response_of(bus.decode(first.data, REPLY_MAX)).message.content == "echo: once"
    assert len(await mesh.calls("m-once")) == 1

    # concurrent duplicates (a redelivery racing the original) share the one call
    racing = bus.encode(llm_request("fake", "racing", model="m-slow"))
    replies = await asyncio.gather(*(mesh.raw_request("bl.llm.fake", racing) for _ in range(3)))
    assert len({r.data for r in replies}) == 1
    assert len(await mesh.calls("m-slow")) == 1
    health = await mesh.health()
    # one duplicate answered from the KV store, the racing ones shared the in-flight call
    # (or, on a very slow machine, found its stored result)
    assert health["cached"] + health["shared_duplicates"] == 3


# --- bad input -----------------------------------------------------------------------------


async def test_bad_requests_get_clear_error_replies_and_the_gateway_keeps_serving(
    mesh: Mesh,
) -> None:
    await mesh.start(BEAMLINE_MAX_MESSAGE_BYTES=4096)

    async def reason(subject: str, data: bytes) -> tuple[str, str, str]:
        msg = await mesh.raw_request(subject, data)
        error = error_of(bus.decode(msg.data, REPLY_MAX))
        assert msg.headers and msg.headers[subjects.H_REASON] == error.reason
        return error.reason, error.message, bus.decode(msg.data, REPLY_MAX).conversation_id

    assert (await reason("bl.llm.fake", b"{not json"))[0] == "not_json"
    wrong = json.dumps({"sender": "agent-7", "conversation_id": "conv-9", "payload": {}})
    why, message, conversation = await reason("bl.llm.fake", wrong.encode())
    assert why == "invalid_schema" and "not a valid envelope" in message
    assert conversation == "conv-9"  # salvaged, so the caller can correlate
    task = Envelope(
        kind=Kind.TASK,
        sender="a",
        recipient="gateway",
        conversation_id="c",
        payload=TaskPayload(prompt="x"),
    )
    why, message, _ = await reason("bl.llm.fake", bus.encode(task))
    assert why == "invalid_schema" and "llm_request" in message
    why, message, _ = await reason("bl.llm.nope", bus.encode(llm_request("nope", "hi")))
    assert why == "unknown_provider" and "'nope'" in message and "fake" in message
    why, message, _ = await reason("bl.llm.fake", bus.encode(llm_request("claude", "hi")))
    assert why == "invalid_schema" and "does not match" in message
    huge = bus.encode(llm_request("fake", "x" * 8000))
    assert (await reason("bl.llm.fake", huge))[0] == "oversized"

    # nobody waiting for a reply: a dead letter with the reason in a header instead
    await mesh.nc.publish("bl.llm.fake", b"\x00garbage")
    letters = await wait_for(lambda: mesh.stream("BL_DLQ"), what="a dead letter")
    headers, body = letters[0]
    assert headers[subjects.H_REASON] == "not_json"
    letter = Envelope.model_validate_json(body)
    assert letter.payload.subject == "bl.llm.fake"  # type: ignore[union-attr]

    answer = response_of(await mesh.ask(llm_request("fake", "still there?")))
    assert answer.message.content == "echo: still there?"
    assert (await mesh.health())["dead_lettered"] == 1
    assert mesh.gateway is not None and mesh.gateway.alive()


# --- secrets, reconnects, stopping -----------------------------------------------------------


async def test_the_api_key_never_appears_in_replies_events_or_logs(mesh: Mesh) -> None:
    echo_key = f"Incorrect API key provided: {SENTINEL}."
    rules = [
        {"name": "401", "match": {"model": "m-401"}, "fault": {"status": 401, "message": echo_key}},
        {"name": "503", "match": {"model": "m-503"}, "fault": {"status": 503, "message": echo_key}},
        {"name": "hang", "match": {"model": "m-hang"}, "fault": {"hang": True}},
    ]
    config = {"timeout_s": 0.3, "max_attempts": 2, "breaker_fail_max": 3}
    await mesh.start(rules, {"fake": config, "claude": config})
    replies: list[bytes] = []
    for provider in ("fake", "claude"):
        for model in ("m-ok", "m-401", "m-503", "m-hang"):
            env = llm_request(provider, f"hi {model}", model=model)
            msg = await mesh.raw_request(f"bl.llm.{provider}", bus.encode(env))
            replies.append(msg.data)
    errors = [error_of(bus.decode(r, REPLY_MAX)) for r in replies if b'"kind":"error"' in r]
    assert any("Incorrect API key provided" in e.message for e in errors)  # the text survives
    await wait_for(lambda: mesh.events("breaker_opened"), what="breaker events")
    everything = b"".join(replies)
    everything += b"".join(d for _, d in await mesh.stream("BL_EVENTS"))
    everything += json.dumps(await mesh.health()).encode()
    assert mesh.gateway is not None
    mesh.gateway.stop(5)
    everything += mesh.gateway.logs().encode()
    assert b"llm call failed" in everything  # the failures were logged...
    assert SENTINEL.encode() not in everything  # ...without the key
    assert b"SENTINEL" not in everything


async def test_the_gateway_serves_again_after_the_nats_server_restarts(mesh: Mesh) -> None:
    await mesh.start()
    assert response_of(await mesh.ask(llm_request("fake", "before")))
    mesh.nats.kill()
    mesh.nats.start()  # same port, same JetStream store

    async def served() -> bool:
        env = await mesh.ask(llm_request("fake", "after"), timeout=1)
        return response_of(env).message.content == "echo: after"

    await wait_for(served, timeout=20, what="the gateway to answer after the restart")


async def test_sigterm_finishes_in_flight_requests_before_exiting(mesh: Mesh) -> None:
    rule = {"name": "slow", "match": {"model": "m-slow"}, "fault": {"latency_ms": 500}}
    await mesh.start([rule])
    pending = asyncio.create_task(mesh.ask(llm_request("fake", "finish me", model="m-slow")))
    await wait_for(lambda: mesh.calls("m-slow"), what="the slow call to reach fakellm")
    assert mesh.gateway is not None
    mesh.gateway.popen.send_signal(signal.SIGTERM)
    answer = response_of(await pending)
    assert answer.message.content == "echo: finish me"
    gateway = mesh.gateway
    await wait_for(lambda: not gateway.alive(), what="the gateway to exit")
    assert gateway.popen.returncode == 0
