"""The ledger's persistence: one key (`ledger`) in the KV bucket `BL_BUDGET`, replaced by
compare-and-set after every change and before any answer that depends on it
(`beamline.kvrecord`).

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
from beamline.kvrecord import RecordConflict as LedgerConflict
from services.budget.ledger import LedgerRecord

__all__ = ["KEY", "LedgerConflict", "LedgerStore"]

KEY = "ledger"


class LedgerStore(KVRecord[LedgerRecord]):
    def __init__(self, kv: KeyValue) -> None:
        super().__init__(
            kv,
            subjects.BUCKET_BUDGET,
            KEY,
            LedgerRecord,
            what="the budget ledger",
            forgets="forgets all spend",
            service="budget",
        )
