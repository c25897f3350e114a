"""The ladder, pure: what a loop gets, and what an escalation's answer or timeout does. No
I/O; the clock is passed in. The service persists `GuardState` (one KV value) after every
change and before it acts on it.

Per agent, each loop climbs one rung of its `loop_guard.ladder` (`restart`, then
`escalate`, by default); past the last rung, the last one repeats. A loop more than
`reset_after_s` after the agent's previous one starts at the bottom again.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from beamline.guard import (
    Addendum,
    Escalation,
    EscalationStatus,
    GuardAction,
    GuardCommand,
    Loop,
    LoopGuard,
    OnTimeout,
    Rung,
    addendum_text,
    how_to_answer,
)
from beamline.ids import derived_id

MAX_SKIPS = 20  # ranges of stale journal entries remembered per agent
MAX_CLOSED = 100  # closed escalations kept for `beamline escalation list --all`


class AgentLadder(BaseModel):
    """Where one agent stands."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    loops: int = 0  # loops acted on since the ladder last started from the bottom
    last_loop_at: float = 0.0
    last_loop_seq: int = 0  # the journal entry that completed the latest loop
    last_loop: Loop | None = None
    last_rung: Rung | None = None
    last_command: str | None = None
    # (loop entry, fence]: journal entries its previous incarnation wrote after a loop was
    # seen and before the guard's restart (or stop) took effect; they are not counted
    skips: tuple[tuple[int, int], ...] = ()

    def skipped(self, seq: int) -> bool:
        return any(start < seq <= end for start, end in self.skips)

    def fenced(self, start: int, end: int) -> AgentLadder:
        """Entries after `start` up to `end` are skipped from now on (kept even when empty:
        it also says that the loop at `start` was carried out)."""
        skips = (*self.skips, (start, max(start, end)))
        return self.model_copy(update={"skips": skips[-MAX_SKIPS:]})

    def renumbered(self) -> AgentLadder:
        """For a journal made again, whose sequence restarted: where the agent stands on its
        ladder stays, the sequences of the old journal go."""
        return self.model_copy(update={"last_loop_seq": 0, "last_loop": None, "skips": ()})

    def carried_out(self, seq: int) -> bool:
        """Whether the loop completed by entry `seq` was acted on and fenced off."""
        return any(start == seq for start, _ in self.skips)


class GuardState(BaseModel):
    """Everything the loop guard must not forget: ladders, escalations, and the commands
    for the supervisor that are not acknowledged yet (sent in order, re-sent until then)."""

    model_config = ConfigDict(extra="forbid")

    agents: dict[str, AgentLadder] = Field(default_factory=dict)
    escalations: dict[str, Escalation] = Field(default_factory=dict)
    outbox: list[GuardCommand] = Field(default_factory=list)

    def queued(self, command_id: str) -> bool:
        return any(c.id == command_id for c in self.outbox)

    def open_escalations(self) -> list[Escalation]:
        return [e for e in self.escalations.values() if e.status is EscalationStatus.OPEN]


@dataclass(frozen=True)
class Decision:
    rung: Rung | None  # None: recorded only (not supervised, or an empty ladder)
    ladder: AgentLadder
    command: GuardCommand | None = None
    escalation: Escalation | None = None


def decide(
    guard: LoopGuard,
    ladder: AgentLadder,
    loop: Loop,
    *,
    agent: str,
    conversation_id: str,
    seq: int,
    now: float,
    supervised: bool,
    trace_id: str = "",
) -> Decision:
    """The rung for a loop completed by journal entry `seq`, and what it sends."""
    fresh = ladder.last_loop_at > 0 and now - ladder.last_loop_at > guard.reset_after_s
    before = 0 if fresh else ladder.loops
    rung = guard.rung(before) if supervised else None
    command: GuardCommand | None = None
    escalation: Escalation | None = None
    key = (agent, str(seq))
    if rung is Rung.RESTART:
        command = GuardCommand(
            id=derived_id("guard", *key, "restart"),
            action=GuardAction.RESTART,
            agent=agent,
            addendum=Addendum(conversation_id=conversation_id, text=addendum_text(loop)),
            reason=loop.describe(),
        )
    elif rung is Rung.ESCALATE:
        escalation = open_escalation(guard, loop, agent, conversation_id, seq, now, trace_id)
        command = GuardCommand(
            id=derived_id("guard", *key, "suspend"),
            action=GuardAction.SUSPEND,
            agent=agent,
            reason=loop.describe(),
            escalation=escalation.id,
        )
    elif rung is Rung.STOP:
        command = GuardCommand(
            id=derived_id("guard", *key, "stop"),
            action=GuardAction.STOP,
            agent=agent,
            reason=loop.describe(),
        )
    after = ladder.model_copy(
        update={
            "loops": before + (1 if rung is not None else 0),
            "last_loop_at": now,
            "last_loop_seq": seq,
            "last_loop": loop,
            "last_rung": rung,
            "last_command": command.id if command else None,
        }
    )
    return Decision(rung, after, command, escalation)


def escalation_id(agent: str, seq: int) -> str:
    """Short enough to type, stable for one loop (a redone decision opens the same one)."""
    return "esc-" + derived_id("escalation", agent, str(seq)).replace("-", "")[:12]


def open_escalation(
    guard: LoopGuard,
    loop: Loop,
    agent: str,
    conversation_id: str,
    seq: int,
    now: float,
    trace_id: str = "",
) -> Escalation:
    eid = escalation_id(agent, seq)
    return Escalation(
        id=eid,
        agent=agent,
        conversation_id=conversation_id,
        loop=loop,
        opened_at=now,
        deadline=now + guard.escalation_timeout_s,
        on_timeout=guard.on_timeout,
        how_to_answer=how_to_answer(eid),
        trace_id=trace_id,
    )


def close(
    escalation: Escalation,
    outcome: OnTimeout,
    now: float,
    *,
    by: str,
    say: str | None = None,
    timed_out: bool = False,
) -> tuple[Escalation, GuardCommand]:
    """The escalation closed with `outcome`, and the command that carries it out: resume
    (with an addendum saying what repeated, and what the human said) or stop."""
    closed = escalation.model_copy(
        update={
            "status": EscalationStatus.TIMED_OUT if timed_out else EscalationStatus.ANSWERED,
            "outcome": outcome,
            "answered_by": by,
            "say": say,
            "closed_at": now,
        }
    )
    text = addendum_text(escalation.loop, say)
    command = GuardCommand(
        id=derived_id("guard", escalation.id, outcome.value),
        action=GuardAction.RESUME if outcome is OnTimeout.RESUME else GuardAction.STOP,
        agent=escalation.agent,
        addendum=(
            Addendum(conversation_id=escalation.conversation_id, text=text)
            if outcome is OnTimeout.RESUME
            else None
        ),
        reason=escalation.loop.describe(),
        escalation=escalation.id,
    )
    return closed, command


def due(state: GuardState, now: float) -> list[Escalation]:
    """Open escalations whose deadline has passed, oldest first."""
    return sorted(
        (e for e in state.open_escalations() if e.deadline <= now), key=lambda e: e.deadline
    )


def prune(state: GuardState) -> None:
    """Keep the open escalations and the latest `MAX_CLOSED` closed ones."""
    closed = sorted(
        (e for e in state.escalations.values() if e.status is not EscalationStatus.OPEN),
        key=lambda e: e.closed_at or 0.0,
    )
    for old in closed[:-MAX_CLOSED] if len(closed) > MAX_CLOSED else []:
        del state.escalations[old.id]
