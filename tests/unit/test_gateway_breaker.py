"""Gateway breaker mechanics: what counts, events on every state change, one trial call."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from beamline.circuit import Circuit
from services.gateway import retry
from services.gateway.breaker import BreakerOpen, ProviderBreaker, ProviderFailure, trial_due


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        self.events.append((name, data))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def fail(breaker: ProviderBreaker, message: str = "read timeout") -> None:
    with pytest.raises(ProviderFailure, match=message), breaker.guard():
        raise ProviderFailure(retry.TIMEOUT, message)


def reset_elapsed(breaker: ProviderBreaker) -> None:
    """Move the opening back past the reset timeout (pybreaker reads the wall clock)."""
    storage = breaker._cb._state_storage
    assert storage.opened_at is not None
    storage.opened_at = storage.opened_at - timedelta(seconds=61)


def test_the_breaker_opens_after_fail_max_failures_and_says_why() -> None:
    events = Recorder()
    breaker = ProviderBreaker("p", fail_max=2, reset_s=60, on_event=events)
    fail(breaker, "first")
    assert breaker.state == "closed" and breaker.fail_count == 1
    fail(breaker, "second")  # the tripping failure is re-raised as itself
    assert breaker.state == "open"
    assert events.names == ["breaker_opened"]
    data = events.events[0][1]
    assert data["provider"] == "p" and data["from"] == "closed" and data["to"] == "open"
    assert "second" in data["reason"]


def test_an_open_breaker_refuses_without_running_the_block() -> None:
    breaker = ProviderBreaker("p", fail_max=1, reset_s=60, on_event=Recorder())
    fail(breaker)
    ran = False
    with pytest.raises(BreakerOpen, match="open"), breaker.guard():
        ran = True
    assert not ran


def test_after_the_reset_timeout_one_trial_runs_and_success_closes() -> None:
    events = Recorder()
    breaker = ProviderBreaker("p", fail_max=1, reset_s=60, on_event=events)
    fail(breaker)
    reset_elapsed(breaker)
    with breaker.guard():
        assert breaker.state == "half-open"
        with pytest.raises(BreakerOpen, match="trial"), breaker.guard():
            pass  # a second caller while the trial runs is refused
    assert breaker.state == "closed"
    assert events.names == ["breaker_opened", "breaker_half_opened", "breaker_closed"]


def test_a_failed_trial_opens_again() -> None:
    events = Recorder()
    breaker = ProviderBreaker("p", fail_max=1, reset_s=60, on_event=events)
    fail(breaker)
    reset_elapsed(breaker)
    fail(breaker, "still down")
    assert breaker.state == "open"
    assert events.names == ["breaker_opened", "breaker_half_opened", "breaker_opened"]


def test_leaving_the_block_normally_is_a_success_that_resets_the_count() -> None:
    # a 429 or a 400 leaves the block without raising: the provider answered
    breaker = ProviderBreaker("p", fail_max=2, reset_s=60, on_event=Recorder())
    fail(breaker)
    with breaker.guard():
        pass
    assert breaker.fail_count == 0 and breaker.state == "closed"


def test_an_open_breaker_half_opens_on_the_gateway_clock_without_a_call() -> None:
    """Agents fail over or pause while it is open, so no call would ever half-open it."""
    now = [0.0]
    events = Recorder()
    breaker = ProviderBreaker("p", fail_max=1, reset_s=5, on_event=events, clock=lambda: now[0])
    assert breaker.record.state == "closed"
    fail(breaker)
    assert breaker.record.state == "open" and breaker.record.last_error == "read timeout"
    now[0] = 4.9
    assert not breaker.half_open_if_due()
    now[0] = 5.0
    assert breaker.half_open_if_due()
    assert breaker.state == "half-open" and breaker.record.state == "half_open"
    assert events.names == ["breaker_opened", "breaker_half_opened"]
    assert not breaker.half_open_if_due()  # only an open breaker is due
    with breaker.guard():
        pass  # the trial succeeds
    assert breaker.record.state == "closed" and breaker.opened_at is None


def test_trial_due_is_pure() -> None:
    assert trial_due(Circuit.OPEN, 10.0, 5.0, 15.0)
    assert not trial_due(Circuit.OPEN, 10.0, 5.0, 14.9)
    assert not trial_due(Circuit.CLOSED, 10.0, 5.0, 99.0)
    assert not trial_due(Circuit.OPEN, None, 5.0, 99.0)


def test_refusal_says_beforehand_what_guard_would_refuse() -> None:
    now = [1000.0]
    breaker = ProviderBreaker(
        "p", fail_max=1, reset_s=60, on_event=Recorder(), clock=lambda: now[0]
    )
    assert breaker.refusal() is None  # closed
    fail(breaker, "read timeout")
    why = breaker.refusal()
    assert why is not None and "is open after: read timeout" in why and "in 60.0s" in why
    now[0] += 61  # its trial is due: the call goes ahead, and half-opens it
    assert breaker.refusal() is None
    breaker.half_open_if_due()
    with breaker.guard():  # the trial, running
        assert breaker.refusal() is not None and "trial running" in (breaker.refusal() or "")
    assert breaker.refusal() is None  # the trial succeeded: closed
