"""A child exited: what does its supervisor do? Pure, as in `supervisor.erl`:

1. restart type x exit reason (`do_restart/4`): a permanent child is always restarted; a
   transient one only after a crash; a temporary one never. A child that is not restarted
   is removed (`Removed`).
2. each restart counts against the intensity window first (`add_restart/1`); past it the
   supervisor gives up (`GaveUp`): it stops its running children in reverse start order and
   exits `shutdown`, and its parent applies its own strategy to that exit.
   A child stopped for `budget_exhausted` is removed too, whatever its restart type: a
   restart would be refused its first call again. It is kept (not forgotten, unless
   temporary), so raising the budget and `restart` bring it back; the exit costs the
   parent no restart intensity.
3. the strategy picks who restarts with the child: one_for_one and simple_one_for_one only
   the child; one_for_all every child; rest_for_one the child and those started after it.
   The others in the group are stopped in reverse start order, then the group starts again
   in start order (temporary ones in the group are dropped, as OTP does).
"""

from __future__ import annotations

from dataclasses import replace

from beamline.tree import Restart, Strategy
from services.supervisor.decision import Decision, GaveUp, Ignored, Removed, Restarted
from services.supervisor.state import ChildState, Exit, ExitReason, SupervisorState


def on_child_exit(
    state: SupervisorState, child_id: str, exit: Exit, now: float
) -> tuple[Decision, SupervisorState]:
    """The decision for `child_id` exiting with `exit` at `now`, and the state after it."""
    child = state.child(child_id)
    if child is None:
        return Ignored(child_id, exit, "unknown_child"), state
    if not child.running:
        return Ignored(child_id, exit, "not_running"), state
    state = _set_running(state, {child_id}, running=False)
    if (
        child.restart is Restart.TEMPORARY
        or (child.restart is Restart.TRANSIENT and exit.is_normal)
        or exit.reason is ExitReason.BUDGET_EXHAUSTED
    ):
        return _remove(state, child, exit)
    allowed, window = state.window.add_restart(now)
    state = replace(state, window=window)
    if not allowed:
        running = tuple(c.id for c in reversed(state.children) if c.running)
        decision = GaveUp(child_id, exit, "reached_max_restart_intensity", running)
        return decision, _set_running(state, set(running), running=False)
    return _restart(state, child, exit)


def _remove(
    state: SupervisorState, child: ChildState, exit: Exit
) -> tuple[Decision, SupervisorState]:
    budget = exit.reason is ExitReason.BUDGET_EXHAUSTED
    forget = child.restart is Restart.TEMPORARY or (
        state.strategy is Strategy.SIMPLE_ONE_FOR_ONE and not budget
    )
    reason = (
        "temporary"
        if child.restart is Restart.TEMPORARY
        else "budget_exhausted"
        if budget
        else "normal_exit"
    )
    if forget:
        state = state.with_children(tuple(c for c in state.children if c.id != child.id))
    return Removed(child.id, exit, reason, forget), state


def _restart(
    state: SupervisorState, child: ChildState, exit: Exit
) -> tuple[Decision, SupervisorState]:
    reason = "permanent" if child.restart is Restart.PERMANENT else "abnormal_exit"
    group = _group(state, child.id)
    others = tuple(c for c in group if c.id != child.id)
    terminate = tuple(c.id for c in reversed(others) if c.running)
    removed = tuple(c.id for c in others if c.restart is Restart.TEMPORARY)
    start = tuple(c.id for c in group if c.restart is not Restart.TEMPORARY)
    kept = tuple(c for c in state.children if c.id not in removed)
    state = _set_running(state.with_children(kept), set(start), running=True)
    return Restarted(child.id, exit, reason, terminate, start, removed), state


def _group(state: SupervisorState, child_id: str) -> tuple[ChildState, ...]:
    """The children restarted together with `child_id`, in start order."""
    if state.strategy is Strategy.ONE_FOR_ALL:
        return state.children
    if state.strategy is Strategy.REST_FOR_ONE:
        return state.children[state.index(child_id) :]
    return tuple(c for c in state.children if c.id == child_id)


def _set_running(state: SupervisorState, ids: set[str], running: bool) -> SupervisorState:
    return state.with_children(
        tuple(replace(c, running=running) if c.id in ids else c for c in state.children)
    )
