"""Gateway retry policy: backoff math, Retry-After, what each HTTP status means."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from beamline.errors import Reason
from services.gateway import retry

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def delay(attempt: int, retry_after: float | None = None, seed: int = 1) -> float:
    return retry.backoff_delay(
        attempt, retry_after, base=0.5, cap=8.0, retry_after_cap=30.0, rng=random.Random(seed)
    )


def test_backoff_stays_within_the_exponential_ceiling_for_each_attempt() -> None:
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0)]:
        samples = [delay(attempt, seed=s) for s in range(300)]
        assert all(0.0 <= d <= ceiling for d in samples)
        # full jitter: spread over the whole range, not bunched at the ceiling
        assert min(samples) < ceiling * 0.1 and max(samples) > ceiling * 0.9


def test_backoff_never_exceeds_the_cap_even_for_huge_attempt_numbers() -> None:
    assert all(delay(attempt, seed=s) <= 8.0 for attempt in (6, 20, 500) for s in range(50))


def test_backoff_is_deterministic_for_a_seeded_rng() -> None:
    assert delay(3, seed=42) == delay(3, seed=42)


def test_retry_after_wins_over_backoff_and_is_capped() -> None:
    assert delay(1, retry_after=3.0) == 3.0
    assert delay(4, retry_after=0.0) == 0.0
    assert delay(1, retry_after=600.0) == 30.0
    assert delay(1, retry_after=-5.0) == 0.0


def test_attempt_numbers_are_one_based() -> None:
    with pytest.raises(ValueError):
        delay(0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("2", 2.0), (" 1.5 ", 1.5), ("0", 0.0), ("-3", 0.0), (None, None), ("", None)],
)
def test_retry_after_in_seconds(header: str | None, expected: float | None) -> None:
    assert retry.parse_retry_after(header, NOW) == expected


def test_retry_after_as_http_date_counts_from_now() -> None:
    header = format_datetime(NOW + timedelta(seconds=7), usegmt=True)
    assert retry.parse_retry_after(header, NOW) == pytest.approx(7.0)


def test_retry_after_http_date_in_the_past_means_now() -> None:
    header = format_datetime(NOW - timedelta(minutes=5), usegmt=True)
    assert retry.parse_retry_after(header, NOW) == 0.0


def test_garbage_retry_after_is_ignored() -> None:
    assert retry.parse_retry_after("soon, please", NOW) is None


def test_success_statuses_need_no_verdict() -> None:
    assert retry.classify_status(200) is None
    assert retry.classify_status(204) is None


def test_rate_limit_is_retried_but_does_not_trip_the_breaker() -> None:
    verdict = retry.classify_status(429)
    assert verdict is not None
    assert verdict.retry and not verdict.breaker_failure
    assert verdict.reason is Reason.RATE_LIMITED


@pytest.mark.parametrize("status", [500, 502, 503, 504, 529])
def test_server_errors_are_retried_and_count_against_the_breaker(status: int) -> None:
    verdict = retry.classify_status(status)
    assert verdict is not None
    assert verdict.retry and verdict.breaker_failure
    assert verdict.reason is Reason.PROVIDER_ERROR


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_client_errors_are_final_and_not_the_providers_fault(status: int) -> None:
    verdict = retry.classify_status(status)
    assert verdict is not None
    assert not verdict.retry and not verdict.breaker_failure
    # a reason of its own: agents retry provider_error, and a refusal would only recur
    assert verdict.reason is Reason.PROVIDER_REJECTED


def test_timeouts_and_bad_bodies_count_against_the_breaker() -> None:
    assert retry.TIMEOUT.breaker_failure and retry.TIMEOUT.retry
    assert retry.CONNECTION.breaker_failure and retry.CONNECTION.retry
    assert retry.BAD_RESPONSE.breaker_failure and not retry.BAD_RESPONSE.retry


def test_a_429s_retry_after_throttles_the_provider_until_the_latest_pause_ends() -> None:
    assert retry.throttle_until(0.0, 100.0, 2.0, cap=30) == 102.0
    assert retry.throttle_until(105.0, 100.0, 2.0, cap=30) == 105.0  # a longer pause stands
    assert retry.throttle_until(0.0, 100.0, 600.0, cap=30) == 130.0  # capped
    assert retry.throttle_until(7.0, 100.0, None, cap=30) == 7.0  # no Retry-After: no pause
