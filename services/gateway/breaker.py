"""One circuit breaker per provider (pybreaker), its state changes reported as events.

Policy (which outcomes count) lives in `retry.Verdict.breaker_failure`; here only the
mechanics. A failure counts when it is raised inside `guard()` as a `ProviderFailure`;
anything that leaves the block normally (including a 429 or a 400, which prove the
provider is up) counts as a success for pybreaker and resets its failure count.

pybreaker's half-open state lets every call through until one finishes; with many agents
waiting at once that is a thundering herd on a provider that may still be down, so
`guard()` admits a single trial call and refuses the rest while it runs.

pybreaker moves an open breaker to half-open only when a call arrives after the reset
timeout. Agents fail over or pause while a breaker is open, so no call would ever arrive:
the gateway's clock calls `half_open_if_due` instead, which half-opens the breaker when the
reset timeout has passed and so tells the agents (through the event and the `BL_BREAKERS`
record) that one trial call is welcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pybreaker

from beamline.circuit import BreakerRecord, Circuit
from services.gateway.retry import Verdict

EventFn = Callable[[str, dict[str, Any]], None]  # (event name, data)

EVENT_FOR_STATE = {
    pybreaker.STATE_OPEN: "breaker_opened",
    pybreaker.STATE_HALF_OPEN: "breaker_half_opened",
    pybreaker.STATE_CLOSED: "breaker_closed",
}


class ProviderFailure(Exception):
    """An attempt that failed; its text is already scrubbed of secrets."""

    def __init__(
        self,
        verdict: Verdict,
        message: str,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.verdict = verdict
        self.retry_after = retry_after
        self.status = status  # the HTTP status, when the provider answered


class BreakerOpen(Exception):
    """The breaker refused the call: no request was sent."""


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: ProviderBreaker) -> None:
        self._owner = owner

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        self._owner.last_error = (
            str(exc) if isinstance(exc, ProviderFailure) else type(exc).__name__
        )

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._owner.changed(old_state.name if old_state else None, new_state.name)


def trial_due(state: Circuit, opened_at: float | None, reset_s: float, now: float) -> bool:
    """Whether an open breaker has waited its reset timeout and should half-open (pure)."""
    return state is Circuit.OPEN and opened_at is not None and now - opened_at >= reset_s


class ProviderBreaker:
    def __init__(
        self,
        provider: str,
        fail_max: int,
        reset_s: float,
        on_event: EventFn,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.reset_s = reset_s
        self.last_error: str | None = None
        self.transitions = 0
        self.opened_at: float | None = None  # clock() when it last opened
        self.record = BreakerRecord(provider=provider, state=Circuit.CLOSED, reason="started")
        self._clock = clock
        self._on_event = on_event
        self._trial_running = False
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_s,
            listeners=[_Listener(self)],
            name=provider,
        )

    @property
    def state(self) -> str:
        return str(self._cb.current_state)

    @property
    def circuit(self) -> Circuit:
        return Circuit.of(self.state)

    @property
    def fail_count(self) -> int:
        return int(self._cb.fail_counter)

    def _trial_in(self) -> float:
        """Seconds until this open breaker half-opens."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.reset_s - self._clock())

    def refusal(self) -> str | None:
        """Why a call now would be refused without being made, or None when it would go
        ahead: the gateway asks before anything else is spent on the call (a budget
        reservation), so an open breaker answers `circuit_open` whatever else is down."""
        if self._cb.current_state == pybreaker.STATE_CLOSED:
            return None
        if self.circuit is Circuit.OPEN:
            due = trial_due(self.circuit, self.opened_at, self.reset_s, self._clock())
            return None if due else self._open_message()
        return self._trial_message() if self._trial_running else None

    def _open_message(self) -> str:
        return (
            f"circuit for provider {self.provider!r} is open"
            + (f" after: {self.last_error}" if self.last_error else "")
            + f"; one trial call is let through in {self._trial_in():.1f}s"
        )

    def _trial_message(self) -> str:
        return (
            f"circuit for provider {self.provider!r} is half-open, trial running: "
            "its outcome closes or re-opens it; use another provider meanwhile"
        )

    def half_open_if_due(self) -> bool:
        """Half-open the breaker if it has been open for its reset timeout (see the module
        docstring: with agents failing over, no call would do it)."""
        if not trial_due(self.circuit, self.opened_at, self.reset_s, self._clock()):
            return False
        self._cb.half_open()
        return True

    def changed(self, old: str | None, new: str) -> None:
        self.transitions += 1
        if new == pybreaker.STATE_OPEN:
            self.opened_at = self._clock()
            why = self.last_error or "failure threshold reached"
        elif new == pybreaker.STATE_HALF_OPEN:
            why = f"reset timeout of {self._cb.reset_timeout}s elapsed; trying one call"
        else:
            self.opened_at = None
            why = "trial call succeeded"
        data = {"provider": self.provider, "from": old, "to": new, "reason": why}
        if self.last_error:
            data["last_error"] = self.last_error
        self.record = BreakerRecord(
            provider=self.provider, state=Circuit.of(new), reason=why, last_error=self.last_error
        )
        self._on_event(EVENT_FOR_STATE[new], data)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run the block as one guarded call; BreakerOpen if the breaker refuses it.

        A failure that trips the breaker is re-raised as itself (pybreaker would replace it
        with CircuitBreakerError), so the caller always learns what actually went wrong.
        """
        trial = self._cb.current_state != pybreaker.STATE_CLOSED
        if trial and self._trial_running:
            raise BreakerOpen(self._trial_message())
        entered = False
        try:
            if trial:
                self._trial_running = True
            with self._cb.calling():
                entered = True
                yield
        except pybreaker.CircuitBreakerError as err:
            if entered and isinstance(err.__context__, ProviderFailure):
                raise err.__context__ from None
            raise BreakerOpen(self._open_message()) from None
        finally:
            if trial:
                self._trial_running = False
