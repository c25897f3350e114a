"""Gateway replies and duplicate sharing, without NATS."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from beamline import bus
from beamline.envelope import (
    ChatMessage,
    Envelope,
    ErrorPayload,
    Kind,
    LLMRequestPayload,
    LLMResponsePayload,
    Usage,
)
from beamline.errors import Reason
from services.gateway import replies
from services.gateway.idempotency import Singleflight
from services.gateway.providers import Completion


def request() -> Envelope:
    payload = LLMRequestPayload(
        provider="p", model="m", messages=(ChatMessage(role="user", content="hi"),)
    )
    return Envelope(
        kind=Kind.LLM_REQUEST,
        sender="agent-1",
        recipient="gateway",
        conversation_id="c1",
        payload=payload,
    )


def test_a_response_answers_the_request_in_its_trace() -> None:
    req = request()
    assert isinstance(req.payload, LLMRequestPayload)
    done = Completion(
        ChatMessage(role="assistant", content="yo"), Usage(input_tokens=2), "stop", "m"
    )
    env = replies.response(req, req.payload, done, latency_ms=12.5, attempts=2)
    assert isinstance(env.payload, LLMResponsePayload)
    assert env.payload.request_id == req.id and env.payload.attempts == 2
    assert env.recipient == "agent-1" and env.sender == "gateway"
    assert env.trace_id == req.trace_id and env.parent_span_id == req.span_id
    assert env.usage == Usage(input_tokens=2)
    reply = replies.Reply.of(env)
    assert reply.ok and replies.Reply.stored(reply.data) == reply


def test_an_error_reply_carries_the_reason_header() -> None:
    env = replies.error(request(), Reason.PROVIDER_REJECTED, "HTTP 400: nope")
    headers = bus.headers_for(env)
    assert headers["Bl-Reason"] == "provider_rejected"
    assert isinstance(env.payload, ErrorPayload) and env.payload.message == "HTTP 400: nope"


def test_an_error_for_undecodable_bytes_salvages_conversation_and_trace() -> None:
    raw = orjson.dumps({"sender": "agent-7", "conversation_id": "c9", "payload": 1})
    tp = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    env = replies.error(None, Reason.INVALID_SCHEMA, "bad", raw, tp)
    assert env.recipient == "agent-7" and env.conversation_id == "c9"
    assert env.trace_id == "1" * 32 and env.parent_span_id == "2" * 16


def test_an_error_for_garbage_still_is_a_valid_envelope() -> None:
    for raw in (b"\xff\xfe not json", b"[1, 2]", orjson.dumps({"trace_id": "nothex"})):
        env = replies.error(None, Reason.NOT_JSON, "not json", raw, "garbage")
        assert env.recipient == "unknown" and Envelope.model_validate_json(bus.encode(env))


def test_a_dead_letter_keeps_a_bounded_copy_of_the_original() -> None:
    raw = b"x" * 10_000
    env = replies.dead_letter(None, Reason.NOT_JSON, "not json", "bl.llm.p", raw)
    assert env.payload.kind == "dead_letter"
    assert len(env.payload.original) == replies.DLQ_ORIGINAL_MAX
    assert env.payload.original_bytes == 10_000


async def test_concurrent_duplicates_share_one_call() -> None:
    flight: Singleflight[str] = Singleflight()
    calls = 0
    release = asyncio.Event()

    async def work() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "answer"

    tasks = [asyncio.create_task(flight.do("id-1", work)) for _ in range(5)]
    await asyncio.sleep(0)  # let every task reach the flight
    release.set()
    assert await asyncio.gather(*tasks) == ["answer"] * 5
    assert calls == 1 and flight.shared == 4 and len(flight) == 0


async def test_a_failed_call_fails_its_duplicates_and_the_next_one_runs_again() -> None:
    flight: Singleflight[str] = Singleflight()

    async def boom() -> str:
        await asyncio.sleep(0)
        raise RuntimeError("x")

    first = asyncio.create_task(flight.do("k", boom))
    second = asyncio.create_task(flight.do("k", boom))
    for task in (first, second):
        with pytest.raises(RuntimeError):
            await task

    async def fine() -> str:
        return "ok"

    assert await flight.do("k", fine) == "ok"
