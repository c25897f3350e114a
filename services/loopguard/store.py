"""The loop guard's state in KV, bucket `BL_LOOPGUARD`, written by compare-and-set
(`beamline.kvrecord`): key `state` after every change and before the loop guard acts on it
(ladders, escalations, commands not yet acknowledged); key `position` the journal entry it
has finished with, written more lazily (a restart re-reads what came after it)."""

from __future__ import annotations

from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field

from beamline import subjects
from beamline.kvrecord import KVRecord
from services.loopguard.ladder import GuardState

KEY = "state"
POSITION_KEY = "position"


class GuardStore(KVRecord[GuardState]):
    def __init__(self, kv: KeyValue) -> None:
        super().__init__(
            kv,
            subjects.BUCKET_LOOPGUARD,
            KEY,
            GuardState,
            what="the loop guard's state",
            forgets="forgets every ladder and open escalation",
            service="loopguard",
        )


class JournalPosition(BaseModel):
    """The last journal entry the loop guard has finished with (0: none yet)."""

    model_config = ConfigDict(extra="forbid")

    seq: int = Field(default=0, ge=0)


class PositionStore(KVRecord[JournalPosition]):
    """Key `position` of BL_LOOPGUARD: where the journal feed resumes (`beamline.feed`).
    Written on a timer and at stop: a restart after a crash reads a little again."""

    def __init__(self, kv: KeyValue) -> None:
        super().__init__(
            kv,
            subjects.BUCKET_LOOPGUARD,
            POSITION_KEY,
            JournalPosition,
            what="the loop guard's journal position",
            forgets="makes it watch from the journal's end",
            service="loopguard",
        )
        self.saved: int | None = None

    async def position(self) -> int | None:
        """The persisted position; None on a first start."""
        found = await self.load()
        self.saved = found.seq if self.revision else None
        return self.saved

    async def keep(self, seq: int) -> None:
        if seq != self.saved:
            await self.save_or_exit(JournalPosition(seq=seq))
            self.saved = seq
