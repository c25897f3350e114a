"""The control plane's wire contract: heartbeats, child exits, host commands, operator
commands. JSON on core NATS; every message is a pydantic model so both ends validate.

    host       -> bl.sup.hb.<host>            HostHeartbeat    (every heartbeat interval)
    host       -> bl.sup.exit                 ChildExit        (request: the supervisor acks)
    supervisor -> bl.ctl.<host>.<command>     StartAgents | StopAgents | AssignShards |
                                              AgentsQuery      (request -> ControlReply)
    operator   -> bl.admin.<command>          AdminRequest     (request -> AdminReply)
    loopguard  -> bl.sup.guard                GuardCommand     (beamline.guard)

Every command carries the leader's `term`: a host ignores commands from a deposed leader
(a lower term than one it has obeyed), so two supervisors can never both steer it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from beamline.errors import CallerError, Reason
from beamline.guard import Addendum


class Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AgentState(StrEnum):
    """What `beamline ps` shows; the first six come from the host, the rest from the
    supervisor's view of a child that is not running."""

    STARTING = "starting"
    RUNNING = "running"
    WAITING_ON_LLM = "waiting-on-llm"
    WAITING_ON_TOOL = "waiting-on-tool"
    IDLE = "idle"
    # every provider in its `models:` has its breaker open: it holds its message, unacked,
    # and resumes when a breaker half-opens and a trial call succeeds (not hung, not dead)
    PAUSED = "paused"
    RESTARTING = "restarting"
    STOPPED = "stopped"
    # stopped by the loop guard while a human is asked (an escalation): its mailbox keeps
    # its messages until the answer (or the escalation's timeout) resumes or stops it
    SUSPENDED = "suspended"
    DEAD = "dead"


class AgentBeat(Wire):
    """One agent as its host sees it."""

    agent: str
    state: AgentState
    generation: int = 0  # which incarnation: bumped by every (re)start
    mailbox_depth: int = 0
    step: int = 0
    tokens: int = 0
    processed: int = 0
    failed: int = 0
    progress_age_s: float = 0.0  # since it last changed state: a hung agent's grows
    last_error: str | None = None
    provider: str | None = None  # where its LLM calls go now (its first choice, or a failover)
    paused_on: str | None = None  # while paused: the provider whose open breaker holds it


class HostHeartbeat(Wire):
    host: str
    incarnation: str  # new per process: a restarted host is a new host
    labels: dict[str, str] = Field(default_factory=dict)
    shards: tuple[int, ...] = ()
    agents_running: int = 0
    busy: tuple[AgentBeat, ...] = ()  # agents not idle (capped), with their progress age
    term: int = 0  # the highest leader term this host obeys
    interval_s: float = 0.25


class ChildExit(Wire):
    """An agent died on a host (its code raised, its process exited)."""

    host: str
    agent: str
    generation: int
    exit: str  # "normal" | "shutdown" | "shutdown:<term>" | a crash description


class StartAgents(Wire):
    term: int
    agents: tuple[str, ...]  # started in this order
    generations: tuple[int, ...]  # the incarnation each start creates
    # the loop guard's addendum to an agent's system prompt, for one conversation: kept by
    # the supervisor and sent with every start, so it survives restarts, re-homes and
    # failover
    addenda: dict[str, Addendum] = Field(default_factory=dict)


class StopAgents(Wire):
    term: int
    agents: tuple[str, ...]  # stopped in this order (the supervisor sends reverse start order)
    timeout_s: float | None = None  # None: brutal_kill; graceful otherwise, then killed


class AssignShards(Wire):
    """The full set of mailbox shards this host owns from now on (declarative)."""

    term: int
    shards: tuple[int, ...]
    pinned: tuple[str, ...] = ()  # agents with their own mailbox consumer on this host


class AgentsQuery(Wire):
    term: int = 0
    agents: tuple[str, ...] = ()  # empty: every agent on the host
    steps: int = 0  # with inspect: how many journaled steps of the current conversation


class StopOutcome(StrEnum):
    SHUTDOWN = "shutdown"  # finished its message in time
    KILLED = "killed"  # shutdown timeout passed, or brutal_kill
    NOT_RUNNING = "not_running"


class ControlReply(Wire):
    ok: bool = True
    error: str | None = None
    stopped: dict[str, StopOutcome] = Field(default_factory=dict)
    agents: tuple[dict[str, Any], ...] = ()


class AdminCommand(StrEnum):
    PS = "ps"
    TREE = "tree"
    INSPECT = "inspect"
    KILL = "kill"
    RESTART = "restart"
    START_CHILD = "start_child"
    TERMINATE_CHILD = "terminate_child"


MAX_START_CHILD = 10_000  # members per start_child request; start more with more requests


class AdminRequest(Wire):
    target: str | None = None  # an agent (or, for restart, a supervisor; start_child: a pool)
    requested_by: str = "operator"
    # start_child: the new members' suffixes (each named <template>-<suffix>), or a count
    # of members numbered after the pool's highest
    suffixes: tuple[str, ...] = Field(default=(), max_length=MAX_START_CHILD)
    count: int = Field(default=0, ge=0, le=MAX_START_CHILD)


class AdminReply(Wire):
    ok: bool = True
    error: str | None = None
    reason: str | None = None
    result: Any = None


def parse(model: type[BaseModel], data: bytes, max_bytes: int = 256 * 1024) -> Any:
    """Decode a control message, or raise a CallerError naming what is wrong with it."""
    if len(data) > max_bytes:
        raise CallerError(
            f"control message is {len(data)} bytes, over {max_bytes}", Reason.OVERSIZED
        )
    try:
        return model.model_validate_json(data or b"{}")
    except ValueError as exc:
        first = str(exc).splitlines()
        raise CallerError(
            f"not a valid {model.__name__}: {' '.join(first[1:3]) or exc}", Reason.INVALID_SCHEMA
        ) from exc
