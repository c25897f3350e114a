"""OTP's restart intensity as a pure function, with the clock moved by hand."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.supervisor.intensity import RestartIntensity, add_restart


@dataclass
class ManualClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_the_otp_default_allows_one_restart_in_five_seconds() -> None:
    clock = ManualClock()
    window = RestartIntensity()
    allowed, window = window.add_restart(clock())
    assert allowed
    clock.advance(1)
    allowed, window = window.add_restart(clock())
    assert not allowed


def test_intensity_zero_gives_up_at_the_first_restart() -> None:
    assert add_restart((), 0.0, intensity=0, period=5) == (False, (0.0,))


def test_restarts_older_than_the_period_are_forgotten() -> None:
    clock = ManualClock()
    window = RestartIntensity(intensity=2, period=10)
    for _ in range(2):
        allowed, window = window.add_restart(clock())
        assert allowed
        clock.advance(4)
    # t=8: three in 10 s is too many
    assert not window.add_restart(clock())[0]
    clock.advance(2.5)  # t=10.5: the first (t=0) has left the window
    allowed, window = window.add_restart(clock())
    assert allowed and window.restarts == (1004.0, 1010.5)
    assert window.recent(clock()) == 2
    clock.advance(30)
    assert window.recent(clock()) == 0


@pytest.mark.parametrize(("gap", "allowed"), [(5.0, False), (5.001, True)])
def test_the_window_is_inclusive_at_exactly_period_seconds(gap: float, allowed: bool) -> None:
    ok, window = add_restart((), 0.0, intensity=1, period=5)
    assert ok
    assert add_restart(window, gap, intensity=1, period=5)[0] is allowed


def test_the_value_is_immutable_and_sliding_keeps_only_the_window() -> None:
    window = RestartIntensity(intensity=100, period=1)
    for t in range(10):
        _, window = window.add_restart(float(t))
    assert window.restarts == (8.0, 9.0)
    with pytest.raises(AttributeError):
        window.intensity = 5  # type: ignore[misc]
