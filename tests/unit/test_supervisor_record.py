"""The recorded tree: what a standby continues from. A pool of 100,000 members must still
fit in one KV value (one NATS message, 1 MiB by default)."""

from __future__ import annotations

import zlib

import pytest

from beamline.guard import Addendum
from services.supervisor.record import SupervisorRecord, TreeRecord, decode, encode

ONE_MIB = 1024 * 1024


def _pool(members: int) -> TreeRecord:
    names = [f"worker-{i}" for i in range(1, members + 1)]
    return TreeRecord(
        term=7,
        supervisors={"pool": SupervisorRecord(running=dict.fromkeys(names, True))},
        generations=dict.fromkeys(names, 1),
        shards={k: "host-a" for k in range(16)},
    )


def test_a_small_record_stays_readable_json() -> None:
    record = _pool(3)
    data = encode(record)
    assert data.startswith(b"{")
    assert decode(data) == record


def test_a_pool_of_100k_members_fits_in_one_nats_message() -> None:
    record = _pool(100_000)
    data = encode(record)
    assert len(record.model_dump_json()) > ONE_MIB  # it would not fit uncompressed
    assert len(data) < ONE_MIB // 2
    assert decode(data) == record


def test_a_corrupt_record_is_an_error_not_a_tree() -> None:
    with pytest.raises(zlib.error):
        decode(b"\x78garbage")
    with pytest.raises(ValueError):
        decode(b'{"term": "x"}')


def test_the_loop_guards_addenda_and_suspensions_survive_a_failover() -> None:
    record = _pool(3).model_copy(
        update={
            "addenda": {"worker-1": Addendum(conversation_id="c1", text="Loop guard: stop it")},
            "suspended": {"worker-2": "esc-1"},
        }
    )
    assert decode(encode(record)) == record
    # a record written before the loop guard existed reads as having none
    assert decode(b'{"term": 3}').addenda == {} and decode(b'{"term": 3}').suspended == {}
