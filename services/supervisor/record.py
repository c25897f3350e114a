"""The tree's recorded state, in KV (`BL_SUPERVISOR`, key `tree`): what a standby continues
from when it takes over, so it restarts nothing that is healthy.

Restart windows are kept in wall-clock seconds: they must mean the same on another machine.
A big record (a pool of 100,000 members) is zlib-compressed: a KV value must fit in one
NATS message (1 MiB by default), and member names like `worker-123` compress ~10 to 1.
"""

from __future__ import annotations

import logging
import zlib

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field

from beamline.guard import Addendum

log = logging.getLogger("beamline.supervisor.record")

KEY = "tree"
COMPRESS_ABOVE = 32 * 1024  # smaller records stay plain JSON, readable with `nats kv get`


class SupervisorRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    running: dict[str, bool] = Field(default_factory=dict)  # child id -> running
    restarts: tuple[float, ...] = ()  # inside the intensity window


class TreeRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    term: int = 0
    supervisors: dict[str, SupervisorRecord] = Field(default_factory=dict)  # the live ones
    generations: dict[str, int] = Field(default_factory=dict)
    restarts: dict[str, int] = Field(default_factory=dict)  # per agent, by its supervisor
    shards: dict[int, str] = Field(default_factory=dict)
    pinned: dict[str, str] = Field(default_factory=dict)
    addenda: dict[str, Addendum] = Field(default_factory=dict)  # the loop guard's, per agent
    suspended: dict[str, str] = Field(default_factory=dict)  # agent -> why (its escalation)


async def load(kv: KeyValue) -> TreeRecord | None:
    try:
        entry = await kv.get(KEY)
    except KeyNotFoundError:
        return None
    if not entry.value:
        return None
    try:
        return decode(entry.value)
    except (ValueError, zlib.error):
        log.error("recorded tree state unreadable; starting the tree afresh", exc_info=True)
        return None


async def save(kv: KeyValue, record: TreeRecord) -> None:
    await kv.put(KEY, encode(record))


def encode(record: TreeRecord) -> bytes:
    data = record.model_dump_json().encode()
    return zlib.compress(data, 1) if len(data) > COMPRESS_ABOVE else data


def decode(data: bytes) -> TreeRecord:
    """Plain JSON starts with `{`; anything else is the compressed form."""
    return TreeRecord.model_validate_json(data if data[:1] == b"{" else zlib.decompress(data))
