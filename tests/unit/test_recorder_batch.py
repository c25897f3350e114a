"""Recorder batching (pure), ack-subject parsing, backoff, and the fast header parser."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from nats.aio.client import Client as NATSClient

from beamline import rows
from beamline.backoff import backoff
from services.recorder import fastpath
from services.recorder.batch import Batch
from services.recorder.puller import parse_ack_reply


def row(row_id: str, kind: str = "task") -> list[Any]:
    r: list[Any] = [row_id] + [""] * (len(rows.COLUMNS) - 1)
    r[rows.KIND] = kind
    return r


def test_full_at_max_rows() -> None:
    b: Batch[str] = Batch(max_rows=3, max_age_s=10)
    assert b.empty and not b.full and b.time_left(0) is None and not b.due(100)
    for i in range(3):
        assert not b.full
        b.add(row(f"id{i}"), f"m{i}", now=1.0)
    assert b.full and b.due(1.0) and b.time_left(1.0) == 0.0


def test_due_by_age_of_the_first_message() -> None:
    b: Batch[str] = Batch(max_rows=100, max_age_s=0.2)
    b.add(row("a"), "m1", now=10.0)
    b.add(row("b"), "m2", now=10.15)
    assert not b.due(10.19)
    assert b.time_left(10.1) == pytest.approx(0.1)
    assert b.due(10.21)


def test_same_id_twice_is_one_row_but_both_messages_are_acked() -> None:
    b: Batch[str] = Batch(max_rows=10, max_age_s=1)
    assert b.add(row("a"), "m1", now=0)
    assert not b.add(row("a"), "m2", now=0)  # a republished envelope / a redelivered copy
    assert b.ids == ["a"] and b.msgs == ["m1", "m2"] and len(b) == 2


def test_dedup_token_is_sha256_of_the_ordered_ids() -> None:
    def make(ids: list[str]) -> Batch[str]:
        b: Batch[str] = Batch(max_rows=10, max_age_s=1)
        for i in ids:
            b.add(row(i), i, now=0)
        return b

    one, same, other_order = make(["a", "b", "c"]), make(["a", "b", "c"]), make(["c", "b", "a"])
    assert one.token == same.token
    assert one.token != other_order.token
    assert one.token == hashlib.sha256(b"a\nb\nc\n").hexdigest()
    assert make(["ab", "c"]).token != make(["a", "bc"]).token  # ids are delimited


def test_drop_already_stored_ids_changes_rows_and_token() -> None:
    b: Batch[str] = Batch(max_rows=10, max_age_s=1)
    for i in ("a", "b", "c"):
        b.add(row(i), i, now=0, redelivered=i != "b")
    assert b.redelivered_ids() == ["a", "c"]
    before = b.token
    assert b.drop({"a": True, "zzz": True}) == 1
    assert b.ids == ["b", "c"] and b.msgs == ["a", "b", "c"]  # every message is still acked
    assert b.token != before
    assert b.drop({}) == 0
    b.add(row("a"), "a2", now=0)  # the index was rebuilt: a can come back
    assert b.ids == ["b", "c", "a"]


def test_after_a_failed_insert_every_id_is_checked() -> None:
    b: Batch[str] = Batch(max_rows=10, max_age_s=1)
    b.add(row("a"), "a", now=0)
    b.add(row("b"), "b", now=0)
    assert b.redelivered_ids() == []
    b.mark_uncertain()
    assert b.redelivered_ids() == ["a", "b"]


def test_parse_ack_reply() -> None:
    assert parse_ack_reply("$JS.ACK.BL_TASKS.recorder.3.1042.77.1795417883674361581.12") == (
        "BL_TASKS",
        3,
        1042,
        1795417883674361581,
    )
    # domain-qualified v2 form
    v2 = "$JS.ACK.hub.ACCHASH.BL_DLQ.recorder.1.5.5.1795417883674361581.0.rand"
    assert parse_ack_reply(v2) == ("BL_DLQ", 1, 5, 1795417883674361581)
    for bad in (
        "",
        "_INBOX.abc",
        "$JS.ACK.x.y",
        "$JS.ACK.S.C.one.2.3.4.5",
        "$JS.NAK.S.C.1.2.3.4.5",
    ):
        assert parse_ack_reply(bad) is None


def test_backoff_is_capped_exponential_with_jitter() -> None:
    for attempt in range(1, 40):
        d = backoff(attempt, 0.2, 30.0)
        full = min(30.0, 0.2 * 2 ** (attempt - 1))
        assert full / 2 <= d <= full
    assert backoff(100, 0.2, 30.0) <= 30.0


HEADER_BLOCKS = [
    b"Nats-Msg-Id: 01a2\r\ntraceparent: 00-aa-bb-01\r\nBl-Kind: task\r\nBl-Schema: 1\r\n\r\n",
    b"A:b\r\nNoColon\r\n: empty name\r\nBad Name: x\r\nTab\tName: y\r\n\r\n",
    b"K:  spaced value  \r\nK: later wins\r\nUtf8: caf\xc3\xa9\r\nBroken: \xff\xfe\r\n",
    b"N\xc3\xa4me: non-ascii name\r\nSep\x1cName: x\r\nok:\r\n\r\n",
    b"",
]


@pytest.mark.parametrize("raw", HEADER_BLOCKS)
def test_fast_header_parser_matches_nats_py(raw: bytes) -> None:
    assert fastpath.parse_header_lines(raw) == NATSClient._parse_header_lines(raw)
    assert fastpath.parse_header_lines(raw) == NATSClient._parse_header_lines(raw)  # cached


def test_install_replaces_the_parser_on_one_connection_only() -> None:
    nc, other = NATSClient(), NATSClient()
    assert fastpath.install(nc)
    assert nc._parse_header_lines is fastpath.parse_header_lines
    assert other._parse_header_lines is not fastpath.parse_header_lines


def test_an_envelope_is_preferred_over_a_raw_row_with_the_same_id() -> None:
    b: Batch[str] = Batch(max_rows=10, max_age_s=1)
    b.add(row("t1", "raw"), "plain task", now=0)
    assert b.add(row("t1", "task"), "its envelope", now=0)  # replaces the raw row
    assert not b.add(row("t1", "raw"), "raw again", now=0)  # never the other way
    assert [r[rows.KIND] for r in b.rows] == ["task"] and len(b) == 3
    b.add(row("r1", "raw"), "other", now=0)
    # stored: t1 only as raw, r1 as raw -> keep the envelope t1, drop the raw r1
    assert b.drop({"t1": False, "r1": False}) == 1
    assert b.ids == ["t1"]
    assert b.drop({"t1": True}) == 1 and b.ids == []
