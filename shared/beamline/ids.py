"""Identifiers: time-ordered envelope ids (UUIDv7) and W3C trace/span ids."""

from __future__ import annotations

import os
import re
import time
import uuid

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


_last_ms = 0
_seq = 0


def uuid7() -> str:
    """A UUIDv7 string (RFC 9562): 48-bit unix milliseconds, a 12-bit sequence that keeps
    ids from one process strictly increasing within a millisecond, then randomness."""
    global _last_ms, _seq
    ms = time.time_ns() // 1_000_000
    if ms <= _last_ms:
        ms = _last_ms
        _seq += 1
        if _seq > 0xFFF:  # sequence exhausted: borrow the next millisecond
            ms, _seq = ms + 1, 0
    else:
        _seq = int.from_bytes(os.urandom(1), "big")  # random start, room to count up
    _last_ms = ms
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | _seq << 64 | 0b10 << 62
    value |= int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def derived_id(*parts: str) -> str:
    """A stable id for something that has no id of its own yet (e.g. a raw message at a
    stream sequence), so that re-processing it yields the same id and de-duplicates."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "beamline:" + ":".join(parts)))


def new_trace_id() -> str:
    return os.urandom(16).hex()


def new_span_id() -> str:
    return os.urandom(8).hex()


def is_token(value: str) -> bool:
    """True when `value` can stand as one NATS subject token (agent names, roles, ids)."""
    return bool(_TOKEN.match(value))
