"""The ledger's persistence: one key (`ledger`) in the KV bucket `BL_BUDGET`, replaced by
compare-and-set after every change and before any answer that depends on it.

Why KV and not a rebuild from the event stream: reservations are not events (they are held
and dropped within a call), and a restarted service must know what is held as well as what
is spent. Why compare-and-set: a second budget service writing the same ledger would make
both wrong; the revision check makes the loser stop (exit 70) instead of overwriting.
"""

from __future__ import annotations

import logging

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from beamline import subjects
from beamline.errors import ConfigError
from services.budget.ledger import LedgerRecord

log = logging.getLogger("beamline.budget.store")

KEY = "ledger"


class LedgerConflict(RuntimeError):
    """Another writer changed the ledger since this service read it."""


class LedgerStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.revision = 0  # 0: the key does not exist yet
        self.saves = 0

    async def load(self) -> LedgerRecord:
        """The persisted ledger, or an empty one on a first start. An unreadable one stops
        the service: starting from zero would forget spend, and spend must never be lost."""
        try:
            entry = await self.kv.get(KEY)
        except KeyNotFoundError:
            return LedgerRecord()
        self.revision = entry.revision or 0
        try:
            return LedgerRecord.model_validate_json(entry.value or b"{}")
        except ValidationError as exc:
            raise ConfigError(
                f"the budget ledger in KV {subjects.BUCKET_BUDGET}/{KEY} is unreadable ({exc.errors()[0]}"
                f"): fix or delete that key (`nats kv del {subjects.BUCKET_BUDGET} {KEY}` forgets "
                "all spend) before starting the budget service"
            ) from exc

    async def save(self, record: LedgerRecord) -> None:
        data = record.model_dump_json().encode()
        try:
            if self.revision == 0:
                self.revision = await self.kv.create(KEY, data)
            else:
                self.revision = await self.kv.update(KEY, data, last=self.revision)
        except KeyWrongLastSequenceError as exc:
            raise LedgerConflict(
                f"the budget ledger changed under this service (revision {self.revision}): "
                "is a second budget service running? Run exactly one"
            ) from exc
        self.saves += 1
