"""OTP's restart limit: at most `intensity` restarts within any `period` seconds.

A pure function of (restart timestamps, now, intensity, period), as in `supervisor.erl`'s
`add_restart/1`: the new restart is added, restarts older than `period` are forgotten, and
the restart is allowed while the count, this one included, is <= intensity. Otherwise the
supervisor gives up: it terminates its children and exits, and its parent decides.

The clock is injected: callers pass `now` (the service shell uses `time.monotonic`), so
tests move time by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

Clock = Callable[[], float]


def add_restart(
    restarts: tuple[float, ...], now: float, intensity: int, period: float
) -> tuple[bool, tuple[float, ...]]:
    """(allowed, the restarts still inside the window, newest last, this one included).

    A restart at `then` is inside the window while `now <= then + period` (OTP's
    `inPeriod/3`, inclusive), so with intensity 1 and period 5 a second crash exactly 5 s
    after the first gives up, and one a moment later is allowed."""
    kept = tuple(t for t in restarts if now <= t + period)
    window = (*kept, now)
    return len(window) <= intensity, window


@dataclass(frozen=True, slots=True)
class RestartIntensity:
    """The restart window of one supervisor, as an immutable value."""

    intensity: int = 1
    period: float = 5.0
    restarts: tuple[float, ...] = ()

    def add_restart(self, now: float) -> tuple[bool, RestartIntensity]:
        allowed, window = add_restart(self.restarts, now, self.intensity, self.period)
        return allowed, replace(self, restarts=window)

    def recent(self, now: float) -> int:
        """Restarts inside the window at `now` (for `which_children`-style reports)."""
        return sum(1 for t in self.restarts if now <= t + self.period)
