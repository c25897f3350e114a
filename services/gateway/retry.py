"""Retry policy, pure: what an attempt's outcome means and how long to wait before the next.

No I/O and no clock of its own: the caller passes `now` and a random source, so every
decision here is unit-tested in microseconds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from beamline.errors import Reason


@dataclass(frozen=True)
class Verdict:
    """What one failed attempt means.

    `retry`: another attempt may succeed. `breaker_failure`: the provider itself looks broken
    (it counts towards opening the breaker); a 429 is throttling by a healthy provider and
    a 400 is the caller's fault, so neither counts.
    """

    reason: Reason
    retry: bool
    breaker_failure: bool


TIMEOUT = Verdict(Reason.PROVIDER_TIMEOUT, retry=True, breaker_failure=True)
CONNECTION = Verdict(Reason.PROVIDER_UNAVAILABLE, retry=True, breaker_failure=True)
BAD_RESPONSE = Verdict(Reason.PROVIDER_BAD_RESPONSE, retry=False, breaker_failure=True)
RATE_LIMITED = Verdict(Reason.RATE_LIMITED, retry=True, breaker_failure=False)
SERVER_ERROR = Verdict(Reason.PROVIDER_ERROR, retry=True, breaker_failure=True)
REJECTED = Verdict(Reason.PROVIDER_REJECTED, retry=False, breaker_failure=False)


def classify_status(status: int) -> Verdict | None:
    """None for a success; otherwise what a non-2xx HTTP status means."""
    if 200 <= status < 300:
        return None
    if status == 429:
        return RATE_LIMITED
    if status >= 500 or status == 408:
        return SERVER_ERROR
    return REJECTED


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def backoff_delay(
    attempt: int,
    retry_after: float | None,
    *,
    base: float,
    cap: float,
    retry_after_cap: float,
    rng: random.Random,
) -> float:
    """Seconds to sleep after failed attempt number `attempt` (1-based).

    The provider's Retry-After wins when given (it knows when it will have capacity), up to
    `retry_after_cap`. Otherwise capped exponential backoff with full jitter: uniform in
    [0, min(cap, base * 2**(attempt-1))], which spreads many retrying agents apart instead
    of letting them hit a recovering provider in lockstep.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    if retry_after is not None:
        return min(max(retry_after, 0.0), retry_after_cap)
    ceiling = min(cap, base * 2 ** min(attempt - 1, 62))
    return rng.uniform(0.0, ceiling)


def throttle_until(current: float, now: float, retry_after: float | None, cap: float) -> float:
    """When the provider may next be called, after a 429 that said `retry_after` seconds at
    `now`: the later of that (capped) and any pause already in force. A 429 without
    Retry-After sets no provider-wide pause (the request's own backoff applies)."""
    if retry_after is None:
        return current
    return max(current, now + min(max(retry_after, 0.0), cap))
