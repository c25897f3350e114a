"""Pure batching: rows waiting for one insert, the messages to ack after it, and when to flush.

No I/O here. The service adds (row, msg) pairs as messages arrive, takes the batch when it is
`due`, inserts `rows` with `token`, and then acks every message in `msgs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from beamline.rows import ID, KIND, KIND_RAW, dedup_token

M = TypeVar("M")


@dataclass
class Batch(Generic[M]):
    """Rows for one insert, de-duplicated by envelope id, and every message they came from.

    Thresholds: `full` at `max_rows` messages, `due` when full or `max_age_s` after the first
    message arrived. Two messages with the same id (an envelope republished, or a redelivered
    copy of a message still held here) give one row; both are acked after the insert. When
    a raw row and an envelope share an id (a plain task and the envelope the intake made of
    it), the envelope is the row.
    """

    max_rows: int
    max_age_s: float
    rows: list[list[Any]] = field(default_factory=list)
    msgs: list[M] = field(default_factory=list)
    started: float | None = None  # monotonic time of the first message
    redelivered: set[str] = field(default_factory=set)  # ids of messages delivered > once
    _index: dict[str, int] = field(default_factory=dict)  # id -> position in rows

    def add(self, row: list[Any], msg: M, now: float, redelivered: bool = False) -> bool:
        """Add a message and its row; return False when the row's id is already here."""
        if self.started is None:
            self.started = now
        self.msgs.append(msg)
        row_id: str = row[ID]
        if redelivered:
            self.redelivered.add(row_id)
        if row_id in self._index:
            i = self._index[row_id]
            if self.rows[i][KIND] == KIND_RAW and row[KIND] != KIND_RAW:
                self.rows[i] = row  # the envelope is the better record of the message
                return True
            return False
        self._index[row_id] = len(self.rows)
        self.rows.append(row)
        return True

    def __len__(self) -> int:
        return len(self.msgs)

    @property
    def empty(self) -> bool:
        return not self.msgs

    @property
    def full(self) -> bool:
        return len(self.msgs) >= self.max_rows

    def due(self, now: float) -> bool:
        return self.full or (self.started is not None and now - self.started >= self.max_age_s)

    def time_left(self, now: float) -> float | None:
        """Seconds until the age threshold (0 when due); None while empty."""
        if self.started is None:
            return None
        if self.full:
            return 0.0
        return max(0.0, self.started + self.max_age_s - now)

    @property
    def ids(self) -> list[str]:
        return [r[ID] for r in self.rows]

    @property
    def token(self) -> str:
        """The insert de-duplication token: sha256 of the ordered ids of the rows. Same
        rows in the same order, same token, so retrying an insert that was stored adds 0."""
        return dedup_token(self.ids)

    def drop(self, stored: Mapping[str, bool]) -> int:
        """Remove rows already stored (their messages are still acked). `stored` maps an id
        to True when an envelope row is stored for it, False when only a raw row is: an
        envelope is kept over a stored raw row."""

        def gone(row: list[Any]) -> bool:
            if row[ID] not in stored:
                return False
            return row[KIND] == KIND_RAW or stored[row[ID]]

        before = len(self.rows)
        self.rows = [r for r in self.rows if not gone(r)]
        if len(self.rows) != before:
            self._index = {r[ID]: i for i, r in enumerate(self.rows)}
        return before - len(self.rows)

    def mark_uncertain(self) -> None:
        """After a failed insert (which may still have landed): look up every id before
        the next attempt, as for redelivered messages."""
        self.redelivered.update(self._index)

    def redelivered_ids(self) -> list[str]:
        """Ids to look up in the table before inserting: from messages delivered again."""
        return [i for i in self._index if i in self.redelivered]
