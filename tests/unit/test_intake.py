from __future__ import annotations

from datetime import UTC, datetime

import pytest

from beamline.envelope import Envelope, Kind, ReplyPayload, TaskPayload
from beamline.errors import CallerError, Reason
from services.agent import intake

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def to_task(data: bytes, headers: dict[str, str] | None = None) -> Envelope:
    return intake.to_task(
        data, headers, recipient="a", origin="BL_TASKS:7", received=NOW, max_bytes=1000
    )


def test_plain_text_is_a_task_with_ids_derived_from_its_place_in_the_stream() -> None:
    env = to_task(b"what is 2+2?")
    assert isinstance(env.payload, TaskPayload) and env.payload.prompt == "what is 2+2?"
    assert env == to_task(b"what is 2+2?")  # a redelivery is the same envelope
    assert env.conversation_id == env.id and env.ts == NOW


def test_json_tasks_carry_conversation_and_reply_subject() -> None:
    env = to_task(b'{"prompt": "hi", "conversation_id": "c-1", "reply_to": "my.inbox"}')
    assert env.conversation_id == "c-1"
    assert isinstance(env.payload, TaskPayload) and env.payload.reply_to == "my.inbox"


def test_the_publisher_id_and_traceparent_are_honoured() -> None:
    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    env = to_task(b"hi", {"Nats-Msg-Id": "my-id-1", "traceparent": tp})
    assert env.id == "my-id-1" and env.trace_id == "a" * 32 and env.parent_span_id == "b" * 16


def test_a_full_envelope_is_accepted_as_is() -> None:
    sent = Envelope(
        kind=Kind.TASK,
        sender="x",
        recipient="?",
        conversation_id="c",
        payload=TaskPayload(prompt="p"),
    )
    got = to_task(sent.model_dump_json().encode())
    assert got == sent  # unchanged: the same id always names the same content


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"   ", Reason.INVALID_SCHEMA),
        (b'{"prompt": "x"', Reason.NOT_JSON),
        (b'{"promt": "x"}', Reason.INVALID_SCHEMA),
        (b'{"prompt": ""}', Reason.INVALID_SCHEMA),
        (b'{"prompt": "x", "conversation_id": "has space"}', Reason.INVALID_SCHEMA),
        (b"\xff\xfe", Reason.NOT_JSON),
        (b"x" * 1001, Reason.OVERSIZED),
    ],
)
def test_bad_tasks_are_refused_with_a_reason(data: bytes, reason: Reason) -> None:
    with pytest.raises(CallerError) as info:
        to_task(data)
    assert info.value.reason is reason


def test_an_envelope_of_another_kind_is_not_a_task() -> None:
    reply = Envelope(
        kind=Kind.REPLY,
        sender="x",
        recipient="y",
        conversation_id="c",
        payload=ReplyPayload(task_id="t", text="hi"),
    )
    with pytest.raises(CallerError, match="reply envelope"):
        to_task(reply.model_dump_json().encode())
