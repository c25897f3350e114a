"""The ladder as pure decisions: which rung a loop gets, what it sends the supervisor, and
how an escalation closes (answered, or timed out)."""

from __future__ import annotations

from beamline.guard import (
    EscalationStatus,
    GuardAction,
    Loop,
    LoopGuard,
    LoopKind,
    OnTimeout,
    Rung,
)
from services.loopguard.ladder import (
    MAX_CLOSED,
    AgentLadder,
    Decision,
    GuardState,
    close,
    decide,
    due,
    escalation_id,
    prune,
)

LOOP = Loop(kind=LoopKind.SAME_TOOL_CALL, count=3, tool="search", arguments='{"q":"x"}')
GUARD = LoopGuard(escalation_timeout_s=60)


def loop_at(
    ladder: AgentLadder, seq: int, now: float, guard: LoopGuard = GUARD, **kw: object
) -> Decision:
    args = {"agent": "a", "conversation_id": "c1", "seq": seq, "now": now, "supervised": True}
    args.update(kw)
    return decide(guard, ladder, LOOP, **args)  # type: ignore[arg-type]


def test_the_first_loop_restarts_with_an_addendum_the_second_escalates_and_suspends() -> None:
    first = loop_at(AgentLadder(), seq=10, now=1000.0)
    assert first.rung is Rung.RESTART and first.escalation is None
    assert first.command is not None and first.command.action is GuardAction.RESTART
    assert first.command.addendum is not None
    assert first.command.addendum.conversation_id == "c1"
    assert "`search` 3 times" in first.command.addendum.text
    assert first.ladder.loops == 1 and first.ladder.last_loop_seq == 10

    second = loop_at(first.ladder, seq=20, now=1010.0, trace_id="t" * 32)
    assert second.rung is Rung.ESCALATE
    escalation, command = second.escalation, second.command
    assert escalation is not None and command is not None
    assert command.action is GuardAction.SUSPEND and command.escalation == escalation.id
    assert escalation.id == escalation_id("a", 20) and escalation.id.startswith("esc-")
    assert escalation.deadline == 1070.0 and escalation.on_timeout is OnTimeout.RESUME
    assert escalation.status is EscalationStatus.OPEN and escalation.trace_id == "t" * 32
    assert escalation.id in escalation.how_to_answer and "bl.loopguard.answer" in (
        escalation.how_to_answer
    )
    # the last rung repeats
    assert loop_at(second.ladder, seq=30, now=1020.0).rung is Rung.ESCALATE


def test_the_same_loop_decided_again_gets_the_same_ids() -> None:
    one, two = loop_at(AgentLadder(), 10, 1.0), loop_at(AgentLadder(), 10, 2.0)
    assert one.command is not None and two.command is not None
    assert one.command.id == two.command.id


def test_a_quiet_spell_puts_the_agent_back_at_the_bottom() -> None:
    first = loop_at(AgentLadder(), seq=10, now=1000.0)
    later = loop_at(first.ladder, seq=99, now=1000.0 + GUARD.reset_after_s + 1)
    assert later.rung is Rung.RESTART and later.ladder.loops == 1


def test_unsupervised_agents_and_empty_ladders_are_recorded_only() -> None:
    alone = loop_at(AgentLadder(), seq=10, now=1.0, supervised=False)
    assert alone.rung is None and alone.command is None and alone.ladder.loops == 0
    watch_only = loop_at(AgentLadder(), seq=10, now=1.0, guard=LoopGuard(ladder=()))
    assert watch_only.rung is None and watch_only.command is None


def test_a_stop_rung_stops_the_agent() -> None:
    stopped = loop_at(AgentLadder(), seq=10, now=1.0, guard=LoopGuard(ladder=(Rung.STOP,)))
    assert stopped.command is not None and stopped.command.action is GuardAction.STOP


def test_an_answer_resumes_with_the_humans_words_or_stops() -> None:
    escalation = loop_at(AgentLadder(loops=1, last_loop_at=1.0), seq=20, now=2.0).escalation
    assert escalation is not None
    done, command = close(escalation, OnTimeout.RESUME, 5.0, by="ops", say="use the cache")
    assert done.status is EscalationStatus.ANSWERED and done.outcome is OnTimeout.RESUME
    assert (done.answered_by, done.say, done.closed_at) == ("ops", "use the cache", 5.0)
    assert command.action is GuardAction.RESUME and command.escalation == escalation.id
    assert command.addendum is not None and command.addendum.text.endswith("use the cache")
    _, stop = close(escalation, OnTimeout.STOP, 5.0, by="ops")
    assert stop.action is GuardAction.STOP and stop.addendum is None


def test_an_unanswered_escalation_times_out_at_its_deadline() -> None:
    escalation = loop_at(AgentLadder(loops=1, last_loop_at=1.0), seq=20, now=2.0).escalation
    assert escalation is not None
    state = GuardState(escalations={escalation.id: escalation})
    assert due(state, escalation.deadline - 0.1) == []
    assert due(state, escalation.deadline) == [escalation]
    done, command = close(escalation, escalation.on_timeout, 70.0, by="timeout", timed_out=True)
    assert done.status is EscalationStatus.TIMED_OUT and command.action is GuardAction.RESUME
    state.escalations[done.id] = done
    assert due(state, 1e9) == []


def test_stale_entries_of_a_stopped_incarnation_are_skipped() -> None:
    ladder = AgentLadder().fenced(10, 14).fenced(30, 30)
    assert [s for s in range(9, 16) if ladder.skipped(s)] == [11, 12, 13, 14]
    assert not ladder.skipped(30)  # an empty range skips nothing, but says it was done
    assert ladder.carried_out(10) and ladder.carried_out(30) and not ladder.carried_out(11)


def test_only_the_latest_closed_escalations_are_kept() -> None:
    base = loop_at(AgentLadder(loops=1, last_loop_at=1.0), seq=1, now=2.0).escalation
    assert base is not None
    state = GuardState()
    for i in range(MAX_CLOSED + 5):
        done, _ = close(base.model_copy(update={"id": f"esc-{i}"}), OnTimeout.STOP, i, by="x")
        state.escalations[done.id] = done
    state.escalations["open"] = base.model_copy(update={"id": "open"})
    prune(state)
    assert len(state.escalations) == MAX_CLOSED + 1 and "open" in state.escalations
    assert "esc-0" not in state.escalations and f"esc-{MAX_CLOSED + 4}" in state.escalations
