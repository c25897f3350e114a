"""How long to wait before the next attempt: the one schedule of the services' retry loops
(the recorder's JetStream set-up, ClickHouse connections and inserts; the gateway's breaker
board; an agent host's breaker watch)."""

from __future__ import annotations

import random


def backoff(attempt: int, initial: float, cap: float) -> float:
    """Capped exponential backoff with jitter: in [d/2, d] for d = min(cap, initial*2^n).

    The jitter keeps recorders that failed together from retrying together."""
    delay = min(cap, initial * float(1 << min(max(attempt, 1) - 1, 30)))
    return delay * random.uniform(0.5, 1.0)
