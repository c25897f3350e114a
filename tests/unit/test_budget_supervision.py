"""`budget_exhausted` as a supervisor sees it: an exit like any other, which no restart
type restarts (a restart would be refused its first call), costing no restart intensity."""

from __future__ import annotations

import pytest

from beamline.tree import Restart, Strategy
from services.supervisor.decision import Removed
from services.supervisor.intensity import RestartIntensity
from services.supervisor.state import BUDGET_EXHAUSTED, ChildState, Exit, SupervisorState
from services.supervisor.strategy import on_child_exit


def test_budget_exhausted_parses_as_its_own_exit_reason_and_is_no_crash() -> None:
    exit = Exit.parse("budget_exhausted")
    assert exit == BUDGET_EXHAUSTED and str(exit) == "budget_exhausted" and exit.is_normal


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize("restart", list(Restart))
def test_a_child_out_of_budget_stays_stopped_whatever_its_restart_type(
    strategy: Strategy, restart: Restart
) -> None:
    children = (ChildState("a"), ChildState("w", restart=restart), ChildState("z"))
    state0 = SupervisorState("s", strategy, children, RestartIntensity(0, 5))
    decision, state = on_child_exit(state0, "w", BUDGET_EXHAUSTED, now=0)
    temporary = restart is Restart.TEMPORARY
    assert decision == Removed(
        "w", BUDGET_EXHAUSTED, "temporary" if temporary else "budget_exhausted", temporary
    )
    # kept (stopped) so that raising the budget and `restart` bring it back; siblings run on,
    # even under one_for_all, and intensity 0 is not exceeded: nothing was restarted
    assert [c.id for c in state.children if c.running] == ["a", "z"]
    assert [c.id for c in state.children] == (["a", "z"] if temporary else ["a", "w", "z"])
    assert state.window.restarts == ()
