"""Gateway retry loop against an in-process HTTP transport (no network, no sleeps of note)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httpx

from beamline.config import Provider
from beamline.envelope import ChatMessage, LLMRequestPayload
from beamline.errors import Reason
from services.gateway.breaker import ProviderBreaker
from services.gateway.providers import wire_for
from services.gateway.redaction import Redactor
from services.gateway.upstream import Backoff, Upstream

KEY = "sk-SENTINEL-123"
REQUEST = LLMRequestPayload(
    provider="fake", model="m", messages=(ChatMessage(role="user", content="hi"),)
)
OK = {
    "choices": [{"message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
}
Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def upstream(handler: Handler, **cfg: Any) -> tuple[Upstream, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    config = Provider(
        kind="openai",
        base_url="http://fake.test/v1",
        api_key_env="FAKE_KEY",
        **{"max_attempts": 3, "breaker_fail_max": 5, **cfg},
    )
    up = Upstream(
        "fake",
        config,
        wire_for("openai"),
        ProviderBreaker("fake", config.breaker_fail_max, 60, lambda n, d: events.append((n, d))),
        api_key=KEY,
        backoff=Backoff(base_s=0.001, cap_s=0.002, retry_after_cap_s=0.05),
        redactor=Redactor([KEY]),
        max_connections=4,
        transport=httpx.MockTransport(handler),
    )
    return up, events


def scripted(*responses: httpx.Response) -> tuple[Handler, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return responses[min(len(seen), len(responses)) - 1]

    return handler, seen


def later(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


async def test_a_success_carries_usage_and_sends_auth_and_traceparent() -> None:
    handler, seen = scripted(httpx.Response(200, json=OK))
    up, _ = upstream(handler)
    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    result = await up.complete(REQUEST, tp, later())
    assert result.completion is not None and result.completion.message.content == "hello"
    assert result.attempts == 1 and result.completion.usage.input_tokens == 3
    assert seen[0].url == "http://fake.test/v1/chat/completions"
    assert seen[0].headers["authorization"] == f"Bearer {KEY}"
    assert seen[0].headers["traceparent"] == tp
    await up.aclose()


async def test_a_429_is_retried_after_retry_after_and_does_not_count() -> None:
    handler, seen = scripted(
        httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"message": "slow"}}),
        httpx.Response(200, json=OK),
    )
    up, events = upstream(handler, breaker_fail_max=1)
    result = await up.complete(REQUEST, None, later())
    assert result.completion is not None and result.attempts == 2 and len(seen) == 2
    assert up.breaker.state == "closed" and events == []
    await up.aclose()


async def test_persistent_rate_limiting_ends_as_rate_limited() -> None:
    handler, seen = scripted(httpx.Response(429, json={"error": {"message": "slow down"}}))
    up, _ = upstream(handler)
    result = await up.complete(REQUEST, None, later())
    assert result.reason is Reason.RATE_LIMITED and len(seen) == 3
    assert "slow down" in (result.error or "")
    await up.aclose()


async def test_server_errors_are_retried_up_to_max_attempts() -> None:
    handler, seen = scripted(httpx.Response(500, text="boom"))
    up, _ = upstream(handler)
    result = await up.complete(REQUEST, None, later())
    assert result.reason is Reason.PROVIDER_ERROR and result.attempts == 3 and len(seen) == 3
    assert "HTTP 500: boom" in (result.error or "") and result.status == 500
    await up.aclose()


async def test_a_400_is_final_and_carries_the_providers_message_without_the_key() -> None:
    body = {"error": {"message": f"Incorrect API key provided: {KEY}"}}
    handler, seen = scripted(httpx.Response(401, json=body))
    up, _ = upstream(handler, breaker_fail_max=1)
    result = await up.complete(REQUEST, None, later())
    assert result.reason is Reason.PROVIDER_REJECTED and len(seen) == 1
    assert "Incorrect API key provided" in (result.error or "")
    assert KEY not in (result.error or "")
    assert up.breaker.state == "closed"
    await up.aclose()


async def test_a_non_json_body_is_a_bad_response_and_not_retried() -> None:
    handler, seen = scripted(httpx.Response(200, text='{"choices": [ trunc'))
    up, _ = upstream(handler)
    result = await up.complete(REQUEST, None, later())
    assert result.reason is Reason.PROVIDER_BAD_RESPONSE and len(seen) == 1
    await up.aclose()


async def test_a_hanging_provider_times_out_and_trips_the_breaker() -> None:
    calls = 0

    async def hang(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    up, events = upstream(
        hang, timeout_s=0.05, connect_timeout_s=0.05, max_attempts=2, breaker_fail_max=2
    )
    result = await up.complete(REQUEST, None, later())
    # the cause stays the timeout; the flag tells the caller the breaker is open now
    assert result.reason is Reason.PROVIDER_TIMEOUT and result.circuit_open and calls == 2
    assert up.breaker.state == "open"
    assert [name for name, _ in events] == ["breaker_opened"]
    refused = await up.complete(REQUEST, None, later())
    assert refused.reason is Reason.CIRCUIT_OPEN and refused.circuit_open
    assert refused.attempts == 0 and calls == 2
    await up.aclose()


async def test_the_deadline_bounds_the_whole_call_including_retries() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    up, _ = upstream(hang, timeout_s=30, max_attempts=5)
    started = time.monotonic()
    result = await up.complete(REQUEST, None, later(0.2))
    assert result.reason is Reason.PROVIDER_TIMEOUT
    assert time.monotonic() - started < 1.0
    await up.aclose()


async def test_a_connection_error_is_retried_and_its_text_is_scrubbed() -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot connect (key {KEY})", request=request)

    up, _ = upstream(refuse)
    result = await up.complete(REQUEST, None, later())
    assert result.reason is Reason.PROVIDER_UNAVAILABLE and result.attempts == 3
    assert KEY not in json.dumps(result.error)
    await up.aclose()


async def test_a_missing_api_key_calls_without_auth_and_names_the_variable_on_401() -> None:
    handler, seen = scripted(httpx.Response(401, json={"error": {"message": "no key"}}))
    up, _ = upstream(handler)
    up._api_key = None
    result = await up.complete(REQUEST, None, later())
    assert result.reason is Reason.PROVIDER_REJECTED
    assert "FAKE_KEY is not set" in (result.error or "")
    assert "authorization" not in seen[0].headers
    await up.aclose()
