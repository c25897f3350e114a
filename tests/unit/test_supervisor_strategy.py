"""Strategy decisions, modelled on OTP's supervisor_SUITE: each strategy, each restart type
x exit reason, intensity -> give up, and escalation decided by the parent's strategy."""

from __future__ import annotations

import pytest

from beamline.tree import ChildKind, Restart, Strategy
from services.supervisor.decision import GaveUp, Ignored, Removed, Restarted
from services.supervisor.intensity import RestartIntensity
from services.supervisor.state import (
    NORMAL,
    SHUTDOWN,
    ChildCounts,
    ChildInfo,
    ChildState,
    Exit,
    ExitReason,
    SupervisorState,
)
from services.supervisor.strategy import on_child_exit

CRASH = Exit.parse("boom")
SHUTDOWN_TERM = Exit.parse("shutdown:drained")
OVERFLOW = Exit.parse("context_overflow")  # an agent whose context window was reset


def sup(
    strategy: Strategy,
    *children: ChildState,
    intensity: int = 10,
    period: float = 5,
) -> SupervisorState:
    kids = children or tuple(ChildState(i) for i in "abcd")
    return SupervisorState("s", strategy, kids, RestartIntensity(intensity, period))


def running(state: SupervisorState) -> list[str]:
    return [c.id for c in state.children if c.running]


def test_exit_reasons_parse_like_otp_terms() -> None:
    assert Exit.parse("normal") == NORMAL and Exit.parse("shutdown") == SHUTDOWN
    assert Exit(ExitReason.SHUTDOWN_TERM, "drained") == SHUTDOWN_TERM
    assert CRASH.reason is ExitReason.CRASH and str(CRASH) == "boom"
    assert OVERFLOW.reason is ExitReason.CONTEXT_OVERFLOW and str(OVERFLOW) == "context_overflow"
    assert [e.is_normal for e in (NORMAL, SHUTDOWN, SHUTDOWN_TERM, CRASH, OVERFLOW)] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_one_for_one_restarts_only_the_child() -> None:
    decision, state = on_child_exit(sup(Strategy.ONE_FOR_ONE), "b", CRASH, now=0)
    assert decision == Restarted("b", CRASH, "permanent", terminate=(), start=("b",))
    assert running(state) == ["a", "b", "c", "d"]


def test_simple_one_for_one_restarts_only_the_child() -> None:
    decision, _ = on_child_exit(sup(Strategy.SIMPLE_ONE_FOR_ONE), "c", CRASH, now=0)
    assert isinstance(decision, Restarted) and decision.start == ("c",) and not decision.terminate


def test_one_for_all_stops_the_others_in_reverse_then_starts_all_in_order() -> None:
    decision, state = on_child_exit(sup(Strategy.ONE_FOR_ALL), "b", CRASH, now=0)
    assert isinstance(decision, Restarted)
    assert decision.terminate == ("d", "c", "a")
    assert decision.start == ("a", "b", "c", "d")
    assert running(state) == ["a", "b", "c", "d"]


def test_rest_for_one_restarts_the_child_and_later_siblings_in_start_order() -> None:
    decision, state = on_child_exit(sup(Strategy.REST_FOR_ONE), "b", CRASH, now=0)
    assert decision == Restarted(
        "b", CRASH, "permanent", terminate=("d", "c"), start=("b", "c", "d")
    )
    assert running(state) == ["a", "b", "c", "d"]


def test_rest_for_one_on_the_last_child_restarts_only_it() -> None:
    decision, _ = on_child_exit(sup(Strategy.REST_FOR_ONE), "d", CRASH, now=0)
    assert isinstance(decision, Restarted) and decision.start == ("d",) and not decision.terminate


def test_a_group_restart_drops_temporary_siblings_and_skips_stopped_ones() -> None:
    children = (
        ChildState("a"),
        ChildState("b", restart=Restart.TEMPORARY),
        ChildState("c", restart=Restart.TRANSIENT, running=False),  # exited normally before
        ChildState("d"),
    )
    decision, state = on_child_exit(sup(Strategy.ONE_FOR_ALL, *children), "d", CRASH, now=0)
    assert isinstance(decision, Restarted)
    assert decision.terminate == ("b", "a")  # c is not running: nothing to stop
    assert decision.removed == ("b",)
    assert decision.start == ("a", "c", "d")  # as OTP: every remaining spec starts again
    assert [c.id for c in state.children] == ["a", "c", "d"] and running(state) == ["a", "c", "d"]


# OTP's do_restart/4: (restart type, exit) -> restarted, or removed and whether forgotten.
MATRIX = [
    (Restart.PERMANENT, NORMAL, "restart"),
    (Restart.PERMANENT, SHUTDOWN, "restart"),
    (Restart.PERMANENT, SHUTDOWN_TERM, "restart"),
    (Restart.PERMANENT, CRASH, "restart"),
    (Restart.PERMANENT, OVERFLOW, "restart"),
    (Restart.TRANSIENT, NORMAL, "keep"),
    (Restart.TRANSIENT, SHUTDOWN, "keep"),
    (Restart.TRANSIENT, SHUTDOWN_TERM, "keep"),
    (Restart.TRANSIENT, CRASH, "restart"),
    (Restart.TRANSIENT, OVERFLOW, "restart"),
    (Restart.TEMPORARY, NORMAL, "forget"),
    (Restart.TEMPORARY, SHUTDOWN, "forget"),
    (Restart.TEMPORARY, SHUTDOWN_TERM, "forget"),
    (Restart.TEMPORARY, CRASH, "forget"),
    (Restart.TEMPORARY, OVERFLOW, "forget"),
]


@pytest.mark.parametrize(("restart", "exit", "outcome"), MATRIX)
def test_each_restart_type_by_exit_reason(restart: Restart, exit: Exit, outcome: str) -> None:
    state0 = sup(Strategy.ONE_FOR_ONE, ChildState("a"), ChildState("w", restart=restart))
    decision, state = on_child_exit(state0, "w", exit, now=0)
    if outcome == "restart":
        reason = "permanent" if restart is Restart.PERMANENT else "abnormal_exit"
        assert decision == Restarted("w", exit, reason, terminate=(), start=("w",))
        assert running(state) == ["a", "w"] and len(state.window.restarts) == 1
        return
    assert isinstance(decision, Removed) and decision.child == "w" and decision.exit == exit
    assert decision.forgotten is (outcome == "forget")
    assert decision.reason == ("temporary" if outcome == "forget" else "normal_exit")
    assert state.window.restarts == ()  # a removal is not a restart
    ids = [c.id for c in state.children]
    assert ids == (["a"] if outcome == "forget" else ["a", "w"]) and running(state) == ["a"]


def test_simple_one_for_one_forgets_a_transient_child_that_exits_normally() -> None:
    state0 = sup(Strategy.SIMPLE_ONE_FOR_ONE, ChildState("w", restart=Restart.TRANSIENT))
    decision, state = on_child_exit(state0, "w", NORMAL, now=0)
    assert decision == Removed("w", NORMAL, "normal_exit", forgotten=True)
    assert state.children == ()


def test_an_exit_from_an_unknown_or_stopped_child_is_ignored() -> None:
    state0 = sup(Strategy.ONE_FOR_ONE, ChildState("a", running=False))
    assert on_child_exit(state0, "zz", CRASH, 0) == (Ignored("zz", CRASH, "unknown_child"), state0)
    assert on_child_exit(state0, "a", CRASH, 0) == (Ignored("a", CRASH, "not_running"), state0)


def test_intensity_exceeded_stops_every_child_in_reverse_order_and_gives_up() -> None:
    state = sup(Strategy.ONE_FOR_ONE, intensity=1, period=5)
    first, state = on_child_exit(state, "b", CRASH, now=0)
    assert isinstance(first, Restarted)
    decision, state = on_child_exit(state, "b", CRASH, now=4)
    assert decision == GaveUp("b", CRASH, "reached_max_restart_intensity", ("d", "c", "a"))
    assert decision.exit_with == SHUTDOWN and decision.event == "supervisor_gave_up"
    assert running(state) == []


def test_restarts_older_than_the_period_do_not_count() -> None:
    state = sup(Strategy.ONE_FOR_ONE, intensity=1, period=5)
    for now in (0.0, 5.5, 11.0, 16.6):  # one crash every 5.5 s never exceeds 1 in 5 s
        decision, state = on_child_exit(state, "a", CRASH, now=now)
        assert isinstance(decision, Restarted)


def test_escalation_is_decided_by_the_parents_own_strategy() -> None:
    # root (rest_for_one): [worker w0, supervisor mid, worker w2]; mid (one_for_one): [x]
    mid = SupervisorState("mid", Strategy.ONE_FOR_ONE, (ChildState("x"),), RestartIntensity(0, 5))
    root = sup(
        Strategy.REST_FOR_ONE,
        ChildState("w0"),
        ChildState("mid", ChildKind.SUPERVISOR, shutdown="infinity"),
        ChildState("w2"),
    )
    gave_up, mid = on_child_exit(mid, "x", CRASH, now=0)
    assert isinstance(gave_up, GaveUp) and gave_up.terminate == ()
    decision, root = on_child_exit(root, "mid", gave_up.exit_with, now=0)
    assert decision == Restarted(
        "mid", SHUTDOWN, "permanent", terminate=("w2",), start=("mid", "w2")
    )


def test_escalation_two_levels_up_ends_at_the_root_giving_up() -> None:
    leaf = SupervisorState("leaf", Strategy.ONE_FOR_ONE, (ChildState("x"),), RestartIntensity(0))
    mid = SupervisorState(
        "mid",
        Strategy.ONE_FOR_ALL,
        (ChildState("leaf", ChildKind.SUPERVISOR), ChildState("y")),
        RestartIntensity(0),
    )
    root = sup(Strategy.ONE_FOR_ONE, ChildState("mid", ChildKind.SUPERVISOR), ChildState("z"))
    root = SupervisorState(root.name, root.strategy, root.children, RestartIntensity(0))
    up1, _ = on_child_exit(leaf, "x", CRASH, now=0)
    assert isinstance(up1, GaveUp)
    up2, _ = on_child_exit(mid, "leaf", up1.exit_with, now=0)
    assert up2 == GaveUp("leaf", SHUTDOWN, "reached_max_restart_intensity", ("y",))
    up3, root = on_child_exit(root, "mid", up2.exit_with, now=0)
    assert up3 == GaveUp("mid", SHUTDOWN, "reached_max_restart_intensity", ("z",))


def test_a_transient_child_supervisor_that_gave_up_is_not_restarted_as_in_otp() -> None:
    parent = sup(Strategy.ONE_FOR_ONE, ChildState("kid", ChildKind.SUPERVISOR, Restart.TRANSIENT))
    decision, _ = on_child_exit(parent, "kid", SHUTDOWN, now=0)
    assert decision == Removed("kid", SHUTDOWN, "normal_exit", forgotten=False)


def test_which_children_and_count_children_report_the_state() -> None:
    state0 = sup(
        Strategy.ONE_FOR_ONE,
        ChildState("a"),
        ChildState("s", ChildKind.SUPERVISOR),
        ChildState("t", restart=Restart.TRANSIENT),
    )
    _, state = on_child_exit(state0, "t", NORMAL, now=0)
    assert state.which_children() == (
        ChildInfo("a", ChildKind.WORKER, Restart.PERMANENT, running=True),
        ChildInfo("s", ChildKind.SUPERVISOR, Restart.PERMANENT, running=True),
        ChildInfo("t", ChildKind.WORKER, Restart.TRANSIENT, running=False),
    )
    assert state.count_children() == ChildCounts(specs=3, active=2, supervisors=1, workers=2)
