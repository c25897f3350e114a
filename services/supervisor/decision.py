"""What a supervisor decides when a child exits. Each decision is an immutable value that
carries its reason code and the child at fault, so the service shell can publish it as an
event (`bl.events.supervisor.<event>`) exactly as decided."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from services.supervisor.state import SHUTDOWN, Exit


@dataclass(frozen=True, slots=True)
class Ignored:
    """Nothing to do: the exit is from a child this supervisor does not run (any more)."""

    event: ClassVar[str] = "child_exit_ignored"
    child: str
    exit: Exit
    reason: str  # "unknown_child" | "not_running"


@dataclass(frozen=True, slots=True)
class Removed:
    """The child stays down: temporary, or transient after a normal exit. `forgotten`: its
    spec is deleted too (temporary children, and any child of simple_one_for_one); otherwise
    it is kept, stopped, and an operator's `restart_child` can start it again."""

    event: ClassVar[str] = "child_removed"
    child: str
    exit: Exit
    reason: str  # "temporary" | "normal_exit" | "budget_exhausted"
    forgotten: bool


@dataclass(frozen=True, slots=True)
class Restarted:
    """Stop `terminate` in that order (reverse start order: gracefully, killed after each
    one's shutdown timeout), then start `start` in start order. `removed`: temporary
    siblings stopped by the group restart that are not started again (OTP drops them)."""

    event: ClassVar[str] = "child_restarted"
    child: str
    exit: Exit
    reason: str  # "permanent" | "abnormal_exit"
    terminate: tuple[str, ...]
    start: tuple[str, ...]
    removed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GaveUp:
    """Restart intensity reached: stop every running child (`terminate`, reverse start
    order), then exit with `exit_with`, which the parent handles as its own child's exit.
    OTP exits with `shutdown` here, so a transient child supervisor is not restarted by its
    parent, and a permanent one is."""

    event: ClassVar[str] = "supervisor_gave_up"
    child: str
    exit: Exit
    reason: str  # "reached_max_restart_intensity"
    terminate: tuple[str, ...]
    exit_with: Exit = SHUTDOWN


Decision = Ignored | Removed | Restarted | GaveUp
