"""The tree's recorded state, in KV (`BL_SUPERVISOR`, key `tree`): what a standby continues
from when it takes over, so it restarts nothing that is healthy.

Restart windows are kept in wall-clock seconds: they must mean the same on another machine.
"""

from __future__ import annotations

import logging

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("beamline.supervisor.record")

KEY = "tree"


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


async def load(kv: KeyValue) -> TreeRecord | None:
    try:
        entry = await kv.get(KEY)
    except KeyNotFoundError:
        return None
    if not entry.value:
        return None
    try:
        return TreeRecord.model_validate_json(entry.value)
    except ValueError:
        log.error("recorded tree state unreadable; starting the tree afresh", exc_info=True)
        return None


async def save(kv: KeyValue, record: TreeRecord) -> None:
    await kv.put(KEY, record.model_dump_json().encode())
