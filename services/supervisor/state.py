"""What a supervisor knows: its children in start order, whether each runs, its restart
window; and how a child exited. Immutable values; decisions return new ones."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from beamline.tree import ChildKind, ChildSpec, Restart, Shutdown, Strategy, SupervisorSpec
from services.supervisor.intensity import RestartIntensity


class ExitReason(StrEnum):
    """OTP's exit reasons as far as a supervisor cares: three normal ones, and the rest."""

    NORMAL = "normal"
    SHUTDOWN = "shutdown"
    SHUTDOWN_TERM = "shutdown_term"  # OTP's {shutdown, Term}: a deliberate stop, with a why
    # the subtree's budget cannot cover its next call: stopped, and not restarted, since a
    # restart cannot cure it (raising the budget and `beamline restart` do)
    BUDGET_EXHAUSTED = "budget_exhausted"
    # the agent's context window was reset (its fresh window is journaled): an abnormal
    # exit, restarted as after a crash and counted against the intensity, so an agent that
    # keeps overflowing is bounded like any other; the next incarnation starts afresh
    CONTEXT_OVERFLOW = "context_overflow"
    CRASH = "crash"  # anything else


@dataclass(frozen=True, slots=True)
class Exit:
    reason: ExitReason
    detail: str = ""  # the term of {shutdown, Term}, or what crashed

    @classmethod
    def parse(cls, text: str) -> Exit:
        """`normal`, `shutdown`, `shutdown:<term>`, `budget_exhausted`,
        `context_overflow`; else a crash."""
        if text in (
            ExitReason.NORMAL,
            ExitReason.SHUTDOWN,
            ExitReason.BUDGET_EXHAUSTED,
            ExitReason.CONTEXT_OVERFLOW,
        ):
            return cls(ExitReason(text))
        if text.startswith("shutdown:"):
            return cls(ExitReason.SHUTDOWN_TERM, text.removeprefix("shutdown:"))
        return cls(ExitReason.CRASH, text)

    @property
    def is_normal(self) -> bool:
        """normal, shutdown, {shutdown, Term} or budget_exhausted: not a crash; a transient
        child that exits so stays down. A crash or context_overflow is abnormal."""
        return self.reason not in (ExitReason.CRASH, ExitReason.CONTEXT_OVERFLOW)

    def __str__(self) -> str:
        if self.reason is ExitReason.SHUTDOWN_TERM:
            return f"shutdown:{self.detail}"
        return self.detail if self.reason is ExitReason.CRASH else self.reason.value


NORMAL = Exit(ExitReason.NORMAL)
SHUTDOWN = Exit(ExitReason.SHUTDOWN)
BUDGET_EXHAUSTED = Exit(ExitReason.BUDGET_EXHAUSTED)


@dataclass(frozen=True, slots=True)
class ChildState:
    id: str
    kind: ChildKind = ChildKind.WORKER
    restart: Restart = Restart.PERMANENT
    shutdown: Shutdown = 5.0
    running: bool = True

    @classmethod
    def from_spec(cls, spec: ChildSpec, running: bool = True) -> ChildState:
        return cls(spec.id, spec.kind, spec.restart, spec.shutdown_or_default, running)


@dataclass(frozen=True, slots=True)
class ChildInfo:
    """One row of `which_children`: OTP's {Id, Child | undefined, Type, Modules}, as data."""

    id: str
    kind: ChildKind
    restart: Restart
    running: bool


@dataclass(frozen=True, slots=True)
class ChildCounts:
    """OTP's `count_children`: specs, active, supervisors, workers."""

    specs: int
    active: int
    supervisors: int
    workers: int


@dataclass(frozen=True, slots=True)
class SupervisorState:
    name: str
    strategy: Strategy
    children: tuple[ChildState, ...] = ()
    window: RestartIntensity = field(default_factory=RestartIntensity)

    _positions: dict[str, int] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_spec(cls, spec: SupervisorSpec, running: bool = True) -> SupervisorState:
        """The state right after every child started, in order. A simple_one_for_one pool
        starts empty: its one child spec is the template of the children added later."""
        children = (
            ()
            if spec.strategy is Strategy.SIMPLE_ONE_FOR_ONE
            else tuple(ChildState.from_spec(c, running) for c in spec.children)
        )
        return cls(
            spec.name, spec.strategy, children, RestartIntensity(spec.intensity, spec.period)
        )

    def _index(self) -> dict[str, int]:
        """Child id -> position, built on first use: a pool can hold 100,000 children."""
        if self._positions is None:
            object.__setattr__(self, "_positions", {c.id: i for i, c in enumerate(self.children)})
        assert self._positions is not None
        return self._positions

    def child(self, child_id: str) -> ChildState | None:
        i = self._index().get(child_id)
        return None if i is None else self.children[i]

    def index(self, child_id: str) -> int:
        return self._index()[child_id]

    def with_children(self, children: tuple[ChildState, ...]) -> SupervisorState:
        return replace(self, children=children, _positions=None)

    def which_children(self) -> tuple[ChildInfo, ...]:
        return tuple(ChildInfo(c.id, c.kind, c.restart, c.running) for c in self.children)

    def count_children(self) -> ChildCounts:
        sups = sum(1 for c in self.children if c.kind is ChildKind.SUPERVISOR)
        active = sum(1 for c in self.children if c.running)
        return ChildCounts(len(self.children), active, sups, len(self.children) - sups)
