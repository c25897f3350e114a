"""A provider's circuit breaker state as the mesh sees it: the gateway writes one record per
provider into the `BL_BREAKERS` bucket at every transition, and agent hosts watch it to
route their LLM calls (fail over, pause, resume).

Why a key-value bucket and not only the `bl.events.gateway.breaker_*` events: events are
history (recorded, for humans and ClickHouse), the bucket is the current state. A host that
starts, restarts or reconnects after a transition reads the latest record at once instead of
having to have seen every event, and a watch on the bucket delivers each change as it
happens. The events stay: they are the record of each transition.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class Circuit(StrEnum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls are refused without reaching the provider
    HALF_OPEN = "half_open"  # one trial call goes through; its outcome closes or re-opens

    @classmethod
    def of(cls, pybreaker_state: str) -> Circuit:
        """pybreaker spells its states `closed`, `open`, `half-open`."""
        return cls(pybreaker_state.replace("-", "_"))


class BreakerRecord(BaseModel):
    """The value under key `<provider>` in `BL_BREAKERS`. Fields a newer gateway adds are
    ignored: an older agent host still reads the state (forbidding them would make it
    ignore every breaker, and never fail over, during a rolling upgrade)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    provider: str
    state: Circuit
    reason: str = ""  # why it changed: the failure that opened it, the trial that closed it
    last_error: str | None = None
    gateway: str = ""  # which gateway instance wrote it (each has its own breakers)
    changed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()
