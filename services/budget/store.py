"""The ledger's persistence in the KV bucket `BL_BUDGET`, two keys replaced by
compare-and-set (`beamline.kvrecord`):

- `ledger`: spend, holds, raised limits, exhaustions; written after every change and before
  any answer that depends on it (each reservation);
- `conversations`: the per-conversation itemisation the exhaustion reports list, written
  by the service every `itemisation_flush_s` when it changed, and at stop. It is most of the
  bytes (200 agents x 50 conversations is 830 KB) and no answer depends on it, so neither a
  reservation nor a settle writes it. A crash loses at most one interval of it, never spend.

Why KV and not a rebuild from the event stream: reservations are not events (they are held
and dropped within a call), and a restarted service must know what is held as well as what
is spent. Why compare-and-set: a second budget service writing the same ledger would make
both wrong; the revision check makes the loser stop (exit 70) instead of overwriting. An
unreadable ledger stops the service: starting from zero would forget spend.
"""

from __future__ import annotations

from nats.js.kv import KeyValue

from beamline import subjects
from beamline.kvrecord import KVRecord
from services.budget.ledger import Itemisation, LedgerRecord

__all__ = ["ITEMISATION_KEY", "KEY", "LedgerStore"]

KEY = "ledger"
ITEMISATION_KEY = "conversations"


class LedgerStore:
    def __init__(self, kv: KeyValue) -> None:
        self.core = KVRecord(
            kv,
            subjects.BUCKET_BUDGET,
            KEY,
            LedgerRecord,
            what="the budget ledger",
            forgets="forgets all spend",
            service="budget",
            exclude=frozenset({"conversations"}),
        )
        self.itemisation = KVRecord(
            kv,
            subjects.BUCKET_BUDGET,
            ITEMISATION_KEY,
            Itemisation,
            what="the budget's per-conversation itemisation",
            forgets="forgets which conversations spent what; spend stays",
            service="budget",
        )

    @property
    def revision(self) -> int:
        return self.core.revision

    async def load(self) -> LedgerRecord:
        record = await self.core.load()
        items = await self.itemisation.load()
        if items.conversations:  # a ledger written before the split keeps its own
            record.conversations = items.conversations
        return record

    async def save(self, record: LedgerRecord) -> None:
        """Before an answer that depends on it: everything but the itemisation. A second
        budget service writing the ledger ends this one (exit 70)."""
        await self.core.save_or_exit(record)

    async def save_itemisation(self, record: LedgerRecord) -> None:
        await self.itemisation.save_or_exit(Itemisation(conversations=record.conversations))
