"""What the recorder has done so far, for its health answer: counts and the last error."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime


def first_line(exc: BaseException, limit: int = 500) -> str:
    """`Type: first line of the message`, short enough for a log field or a health answer
    (ClickHouse errors carry the whole query and a stack trace after the first line)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:limit]


@dataclass
class Health:
    rows_recorded: int = 0
    spans_recorded: int = 0  # otel_traces rows
    raw_rows: int = 0
    poison_rows: int = 0
    duplicates_skipped: int = 0
    batches: int = 0
    acked: int = 0
    ack_failures: int = 0
    failures: int = 0  # consecutive failed inserts (or connection attempts)
    last_error: str | None = None
    last_error_at: str | None = None
    queries: int = 0

    def record_error(self, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = first_line(exc)
        self.last_error_at = datetime.now(UTC).isoformat()
