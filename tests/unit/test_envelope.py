from __future__ import annotations

import uuid

import pytest

from beamline import bus
from beamline.envelope import Envelope, Kind, ReplyPayload, TaskPayload
from beamline.errors import CallerError, Reason
from beamline.ids import derived_id, uuid7


def task(**kw: object) -> Envelope:
    return Envelope(
        kind=Kind.TASK,
        sender="cli",
        recipient="a",
        conversation_id="c1",
        payload=TaskPayload(prompt="hi"),
        **kw,  # type: ignore[arg-type]
    )


def test_uuid7_ids_are_version_7_and_strictly_increasing() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert uuid.UUID(ids[0]).version == 7


def test_derived_ids_are_stable() -> None:
    assert derived_id("BL_TASKS", "7") == derived_id("BL_TASKS:7")
    assert derived_id("a") != derived_id("b")


def test_envelope_round_trips_through_json_with_its_headers() -> None:
    env = task()
    back = bus.decode(bus.encode(env), 10_000)
    assert back == env
    headers = bus.headers_for(env)
    assert headers["Nats-Msg-Id"] == env.id
    assert bus.parse_traceparent(headers["traceparent"]) == (env.trace_id, env.span_id)


def test_kind_may_be_omitted_but_must_match_the_payload() -> None:
    data = task().model_dump(mode="json")
    del data["kind"]
    assert Envelope.model_validate(data).kind is Kind.TASK
    data["kind"] = "reply"
    with pytest.raises(ValueError, match="does not match payload"):
        Envelope.model_validate(data)


def test_child_keeps_the_trace_and_hangs_under_the_parent_span() -> None:
    parent = task()
    child = parent.child(ReplyPayload(task_id=parent.id, text="ok"), sender="a", recipient="cli")
    assert child.trace_id == parent.trace_id
    assert child.parent_span_id == parent.span_id
    assert child.span_id != parent.span_id and child.kind is Kind.REPLY


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", Reason.NOT_JSON),
        (b'{"kind": "task"}', Reason.INVALID_SCHEMA),
        (b"x" * 101, Reason.OVERSIZED),
    ],
)
def test_decode_names_what_is_wrong(data: bytes, reason: Reason) -> None:
    with pytest.raises(CallerError) as info:
        bus.decode(data, 100)
    assert info.value.reason is reason


@pytest.mark.parametrize(
    "value",
    [None, "", "garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "00-xyz-abc-01"],
)
def test_invalid_traceparents_are_ignored(value: str | None) -> None:
    assert bus.parse_traceparent(value) is None
