"""The supervision tree at work: OTP supervisors over the network.

One actor (this class, fed by one queue) owns every supervisor of the tree, as OTP's
supervisors each own their children: it starts children in order, stops them in reverse
order (gracefully, killed after their shutdown timeout), and on a child's exit applies the
pure decision of `strategy.on_child_exit`. A supervisor that gives up stops its children
and exits `shutdown`; its parent handles that exit like any other: that is escalation.

Children are agents on hosts. Where an agent runs follows `placement`: the host that owns
its mailbox shard, or, for a pinned agent, the host picked for its labels. A lost host is
not an agent crash: its agents are re-homed (started where their mailboxes now live) and
resume from their journals without counting against restart intensity.

Every decision is an event on `bl.events.supervisor.<event>`, recorded like any message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from nats.js.kv import KeyValue

from beamline import subjects
from beamline.budget import AccountKind, SubtreeExhausted
from beamline.config import Deployment
from beamline.control import AgentState, HostHeartbeat
from beamline.envelope import Envelope
from beamline.errors import CallerError, Reason
from beamline.events import EventSink, event_envelope
from beamline.guard import Addendum, GuardAction, GuardCommand
from beamline.tree import (
    BRUTAL_KILL,
    INFINITY,
    ChildSpec,
    SupervisorSpec,
    member_name,
    pool_template,
)
from services.supervisor import record
from services.supervisor.commands import INFINITY_S, CommandRefused, HostCommands, HostUnreachable
from services.supervisor.decision import GaveUp, Ignored, Removed, Restarted
from services.supervisor.hosts import HostTable
from services.supervisor.intensity import RestartIntensity
from services.supervisor.placement import (
    NoEligibleHost,
    assign_shards,
    place_pinned,
    rebalance_shards,
)
from services.supervisor.settings import SupervisorSettings
from services.supervisor.state import (
    BUDGET_EXHAUSTED,
    ChildState,
    Exit,
    ExitReason,
    SupervisorState,
)
from services.supervisor.strategy import on_child_exit

log = logging.getLogger("beamline.supervisor")

SOURCE = "supervisor"
EVENT_PER_AGENT_UPTO = 50  # bigger starts on one host (pools, re-homes) get one bulk event
BULK_EVENT_NAMES = 1000


@dataclass(frozen=True)
class ExitSeen:
    agent: str
    generation: int
    exit: str
    host: str


@dataclass(frozen=True)
class HostLost:
    host: str
    restarted: bool = False


@dataclass(frozen=True)
class HostJoined:
    host: str


@dataclass(frozen=True)
class Hung:
    agent: str
    generation: int
    host: str
    age_s: float


@dataclass(frozen=True)
class Operate:
    """An operator's command (kill, restart, start_child, terminate_child), carried out in
    turn with every other decision."""

    command: str
    target: str
    requested_by: str
    done: asyncio.Future[Any]  # the outcome: start_child's started names, else None
    names: tuple[str, ...] = ()  # start_child: the new pool members...
    count: int = 0  # ... or how many, numbered after the pool's highest


@dataclass(frozen=True)
class Lead:
    """This instance leads from now on: continue the recorded tree or start it."""

    term: int


@dataclass(frozen=True)
class Retry:
    """Try again to start what found no host or no answer."""


@dataclass(frozen=True)
class Exhausted:
    """The budget service refused a call: stop this agent or supervisor with its subtree."""

    report: SubtreeExhausted


@dataclass(frozen=True)
class Guarded:
    """The loop guard's command for a looping agent; `done` gets the agent's state after."""

    command: GuardCommand
    done: asyncio.Future[Any]


Input = Lead | ExitSeen | HostLost | HostJoined | Hung | Operate | Retry | Exhausted | Guarded


class Supervision:
    def __init__(
        self,
        deployment: Deployment,
        shards: int,
        settings: SupervisorSettings,
        commands: HostCommands,
        events: EventSink,
        kv: KeyValue,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.commands, self.events, self.kv = settings, commands, events, kv
        self.clock = clock
        self.n_shards = shards
        self.specs: dict[str, SupervisorSpec] = {s.name: s for s in deployment.supervisors}
        self.pools = deployment.pools()  # simple_one_for_one supervisor -> its template
        self.child_specs: dict[str, ChildSpec] = {}
        self.parent: dict[str, str] = {}
        for sup in deployment.supervisors:
            if sup.name in self.pools:
                continue  # the template is no child: its instances are, once started
            for child in sup.children:
                self.child_specs[child.id] = child
                self.parent[child.id] = sup.name
        roots = [name for name in self.specs if name not in self.parent]
        self.root: str | None = roots[0] if roots else None
        self._shards_of: dict[str, int] = {}
        self.need = deployment.pinned_agents()  # isolated agents too: placed the same way
        self.isolated = deployment.isolated_agents()
        self.hosts = HostTable(settings.heartbeat_misses)
        self.states: dict[str, SupervisorState] = {}  # the supervisors that are up
        self.generations: dict[str, int] = {}
        self.restarts: dict[str, int] = {}  # per agent: the restarts its supervisor decided
        self.shards: dict[int, str] = {}
        self.pinned: dict[str, str] = {}
        # the loop guard's: an addendum to an agent's system prompt (sent with every start),
        # and the agents it suspended while a human is asked (kept stopped until resumed)
        self.addenda: dict[str, Addendum] = {}
        self.suspended: dict[str, str] = {}
        self._guard_done: dict[str, str] = {}  # agent -> the last guard command carried out
        self.pending: set[str] = set()  # to run, but not started on a host yet
        self.inbox: asyncio.Queue[Input] = asyncio.Queue()
        self.leading = False
        self._dirty = asyncio.Event()

    # --- inputs (called from subscriptions; never block) ------------------------------

    def on_heartbeat(self, beat: HostHeartbeat) -> None:
        change = self.hosts.seen(beat, time.monotonic())
        if not self.leading:
            return
        if change == "restarted":
            self.inbox.put_nowait(HostLost(beat.host, restarted=True))
        elif change == "joined":
            self.inbox.put_nowait(HostJoined(beat.host))
        for b in beat.busy:
            if b.generation != self.generations.get(b.agent) or not self._is_running(b.agent):
                continue
            if b.state is AgentState.DEAD:  # its exit report was lost: the beat tells
                self.inbox.put_nowait(
                    ExitSeen(b.agent, b.generation, b.last_error or "crash", beat.host)
                )
            elif (
                b.progress_age_s > self.settings.hung_after_s
                # a paused agent waits for a provider's breaker on purpose: killing it as
                # hung would only pause its successor again
                and b.state is not AgentState.PAUSED
            ):
                self.inbox.put_nowait(Hung(b.agent, b.generation, beat.host, b.progress_age_s))

    def check_hosts(self) -> None:
        for host in self.hosts.lost(time.monotonic()):
            if self.leading:
                self.inbox.put_nowait(HostLost(host))

    # --- leading ------------------------------------------------------------------------

    def begin(self, term: int) -> None:
        """Lead from now on. The tree is taken up by `run`, in turn with every other input,
        so no decision ever runs beside another one."""
        self.commands.term = term
        self.leading = True
        self.inbox.put_nowait(Lead(term))

    def step_down(self) -> None:
        self.leading = False
        while not self.inbox.empty():  # what it would have decided is the next leader's
            self.inbox.get_nowait()

    async def _lead(self, term: int) -> None:
        self.events.emit_envelope(
            self._event(
                "leader_elected", self.root or "-", instance=self.settings.instance_id, term=term
            )
        )
        if self.root is None:
            return
        saved = await record.load(self.kv)
        if saved is not None and self._restore(saved):
            log.info(
                "continuing the recorded tree",
                extra={"term": term, "supervisors": len(self.states)},
            )
            await self._reconcile()
            return
        await asyncio.sleep(self.settings.settle_s)  # let the hosts announce themselves
        await self._place()
        await self._start_supervisor(self.root, parent=None)

    async def run(self) -> None:
        """Handle inputs one at a time, in order, like an OTP supervisor's mailbox."""
        while True:
            item = await self.inbox.get()
            done = item.done if isinstance(item, Operate | Guarded) else None
            try:
                outcome = await self._handle(item)
            except CallerError as exc:  # an operator asked for what cannot be done now
                if done is not None and not done.done():
                    done.set_exception(exc)
            except Exception:
                log.exception("supervision step failed", extra={"input": repr(item)})
                if done is not None and not done.done():
                    done.set_exception(RuntimeError("the supervisor failed to carry it out"))
            else:
                if done is not None and not done.done():
                    done.set_result(outcome)
            self._changed()

    async def save_loop(self) -> None:
        """Record the tree after changes, coalescing bursts into one write."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await record.save(self.kv, self.snapshot())
            except Exception:
                log.warning("tree state not recorded; will retry", exc_info=True)
                self._dirty.set()
                await asyncio.sleep(0.5)
            await asyncio.sleep(0.02)

    async def _handle(self, item: Input) -> Any:
        match item:
            case Lead(term=term):
                await self._lead(term)
            case Retry():
                await self._start_pending()
            case ExitSeen(agent=agent, generation=gen, exit=text, host=host):
                if gen == self.generations.get(agent) and agent in self.parent:
                    await self._child_exited(self.parent[agent], agent, Exit.parse(text), host)
            case Hung(agent=agent, generation=gen, host=host, age_s=age):
                if gen == self.generations.get(agent) and self._is_running(agent):
                    await self._kill(agent)
                    why = Exit(ExitReason.CRASH, f"hung: no progress for {age:.1f} s")
                    await self._child_exited(self.parent[agent], agent, why, host)
            case HostLost(host=host, restarted=restarted):
                await self._host_lost(host, restarted)
            case HostJoined(host=host):
                if self.settings.rebalance_on_join:
                    await self._rebalance_to(host)
                await self._place(always={host})
                await self._start_pending()
            case Exhausted(report=report):
                await self._budget_exhausted(report)
            case Guarded(command=command):
                return await self._guard(command)
            case Operate(command="start_child"):
                return await self._start_children(item.target, item.names, item.count)
            case Operate(command="terminate_child"):
                await self._terminate_child(item.target)
            case Operate():
                await self._operate(item)

    # --- OTP: exits, restarts, escalation ------------------------------------------------

    async def _child_exited(self, sup: str, child: str, exit: Exit, host: str = "") -> None:
        state = self.states.get(sup)
        if state is None:
            return  # that supervisor is down: nothing runs under it
        decision, after = on_child_exit(state, child, exit, self.clock())
        if isinstance(decision, Ignored):
            return
        self.states[sup] = after
        self._emit("child_exited", sup, child, exit=str(exit), host=host)
        match decision:
            case Removed(reason=reason, forgotten=forgotten):
                self.pending.discard(child)
                self._emit("child_removed", sup, child, exit=str(exit), reason=reason)
                if forgotten and sup in self.pools:
                    self._forget_member(child)
            case Restarted(terminate=terminate, start=start, reason=reason):
                await self._stop(terminate)
                await self._start(start)
                for restarted in start:  # the crashed child and the siblings of its group
                    self.restarts[restarted] = self.restarts.get(restarted, 0) + 1
                self._emit(
                    "child_restarted",
                    sup,
                    child,
                    exit=str(exit),
                    reason=reason,
                    restarts=after.window.recent(self.clock()),
                    intensity=after.window.intensity,
                    period=after.window.period,
                    terminate=list(terminate),
                    start=list(start),
                )
            case GaveUp(terminate=terminate, exit_with=exit_with):
                await self._stop(terminate)
                del self.states[sup]
                self._emit(
                    "supervisor_gave_up",
                    sup,
                    child,
                    exit=str(exit),
                    restarts=len(after.window.restarts),
                    intensity=after.window.intensity,
                    period=after.window.period,
                )
                parent = self.parent.get(sup)
                if parent is None:
                    log.error(
                        "the root supervisor gave up: the tree is down", extra={"supervisor": sup}
                    )
                    return
                self._emit("escalated", sup, sup, parent=parent)
                await self._child_exited(parent, sup, exit_with)

    async def _budget_exhausted(self, report: SubtreeExhausted) -> None:
        """Stop the exhausted subtree (gracefully: each agent finishes and journals the
        message in hand), then let its parent decide on the exit `budget_exhausted`. The
        event names what the subtree had done: its conversations and their settled calls,
        whose steps stay in the journal."""
        target = report.name
        is_supervisor = report.kind is AccountKind.SUPERVISOR
        up = target in self.states if is_supervisor else self._is_running(target)
        if not up:
            log.info("budget exhausted for a subtree that is not running", extra={"target": target})
            return
        parent = self.parent.get(target)
        self._emit(
            "budget_exhausted",
            parent or target,
            target,
            kind=report.kind.value,
            limit=report.limit.model_dump(exclude_none=True),
            spent_tokens=report.spent_tokens,
            spent_usd=report.spent_usd,
            refused_request=report.refused_request,
            refused_agent=report.refused_agent,
            conversations=[c.model_dump() for c in report.conversations[:BULK_EVENT_NAMES]],
        )
        if is_supervisor:
            await self._stop_supervisor(target)
        else:
            await self._stop([target])
        if parent is None:
            log.error("the root's budget is exhausted: the tree is down", extra={"root": target})
            return
        await self._child_exited(parent, target, BUDGET_EXHAUSTED)

    # --- the loop guard -----------------------------------------------------------------

    async def _guard(self, command: GuardCommand) -> str:
        """Carry out the loop guard's command; the agent's state afterwards. None of them is
        a crash: no exit is handed to the supervisor's strategy and no intensity is spent.
        A looping agent is killed, not stopped gracefully: the message in hand is the loop."""
        agent = command.agent
        sup = self.parent.get(agent)
        if sup is None:
            raise CallerError(
                f"{agent!r} is not a supervised agent: the loop guard cannot act on it",
                Reason.UNKNOWN_RECIPIENT,
            )
        if self._guard_done.get(agent) == command.id:  # re-sent after a lost answer
            return str(self.child_view(agent)["supervised"])
        if sup not in self.states:
            raise CallerError(
                f"{agent!r}'s supervisor {sup!r} is not running; restart it first",
                Reason.INVALID_SCHEMA,
            )
        running = self._is_running(agent)
        if command.addendum is not None:
            self.addenda[agent] = command.addendum
        data: dict[str, Any] = {"command": command.id, "reason": command.reason}
        match command.action:
            case GuardAction.RESTART if running:
                await self._kill(agent)
                await self._start([agent])
                self._emit("guard_restarted", sup, agent, **data, addendum=_text(command))
            case GuardAction.SUSPEND:
                if running:
                    await self._kill(agent)
                    self._set_running(agent, running=False)
                self.suspended[agent] = command.escalation or command.id
                self._emit("agent_suspended", sup, agent, **data, escalation=command.escalation)
            case GuardAction.RESUME:
                self.suspended.pop(agent, None)
                if not running:
                    self._set_running(agent, running=True)
                    await self._start([agent])
                self._emit("agent_resumed", sup, agent, **data, addendum=_text(command))
            case GuardAction.STOP:
                self.suspended.pop(agent, None)
                if running:
                    await self._stop([agent])
                    self._set_running(agent, running=False)
                self._emit("guard_stopped", sup, agent, **data, escalation=command.escalation)
            case _:  # a restart of an agent that is not running: it stays as it is
                log.info("guard restart of an agent not running", extra={"agent": agent})
        self._guard_done[agent] = command.id
        return str(self.child_view(agent)["supervised"])

    def _set_running(self, agent: str, running: bool) -> None:
        sup = self.parent.get(agent)
        if sup is not None and sup in self.states:
            self.states[sup] = _mark(self.states[sup], agent, running)

    async def _start(self, ids: Sequence[str]) -> None:
        """Start children in start order; consecutive agents on one host in one command."""
        batch: list[str] = []
        for cid in ids:
            if cid in self.suspended:  # a human decides when it runs again
                self._set_running(cid, running=False)
                continue
            if cid in self.specs:
                await self._start_agents(batch)
                batch = []
                await self._start_supervisor(cid, self.parent.get(cid))
            else:
                if batch and self._host_of(batch[-1]) != self._host_of(cid):
                    await self._start_agents(batch)
                    batch = []
                batch.append(cid)
        await self._start_agents(batch)

    async def _start_supervisor(self, name: str, parent: str | None) -> None:
        """A (re)started supervisor: a fresh restart window, its children started in order."""
        spec = self.specs[name]
        self.states[name] = SupervisorState.from_spec(spec, running=True)
        if parent is not None:
            self._emit("child_started", parent, name)
        await self._start([c.id for c in spec.children])

    async def _start_agents(self, agents: Sequence[str], rehome_from: str | None = None) -> None:
        if not agents:
            return
        for agent in agents:
            self.generations[agent] = self.generations.get(agent, 0) + 1
        await self._launch(agents, rehome_from)

    async def _launch(self, agents: Sequence[str], rehome_from: str | None = None) -> None:
        """Start each agent's current generation on its host; what cannot start waits."""
        by_host: dict[str, list[str]] = {}
        for agent in agents:
            host = self._host_of(agent)
            if host is None or host not in self.hosts.hosts:
                self.pending.add(agent)
                continue
            by_host.setdefault(host, []).append(agent)
        for host, group in by_host.items():
            try:
                await self.commands.start(
                    host, group, [self.generations[a] for a in group], self.addenda
                )
            except (HostUnreachable, CommandRefused) as exc:
                log.warning(
                    "start not confirmed; will retry", extra={"host": host, "error": str(exc)}
                )
                self.pending.update(group)
                continue
            self.pending.difference_update(group)
            if len(group) > EVENT_PER_AGENT_UPTO:  # a pool's bulk start: one event, not 10,000
                self._emit_bulk(group, host, rehome_from)
                continue
            for agent in group:
                if rehome_from is not None:
                    self._emit(
                        "agent_rehomed",
                        self.parent[agent],
                        agent,
                        agent=agent,
                        from_host=rehome_from,
                        to_host=host,
                    )
                else:
                    self._emit(
                        "child_started",
                        self.parent[agent],
                        agent,
                        host=host,
                        generation=self.generations[agent],
                    )

    async def _start_pending(self) -> None:
        waiting = [a for a in self.order() if a in self.pending and self._is_running(a)]
        self.pending.intersection_update(waiting)
        await self._launch(waiting)

    async def _stop(self, ids: Sequence[str]) -> None:
        """Stop children in the given order (the decisions give reverse start order)."""
        for cid in ids:
            if cid in self.specs:
                await self._stop_supervisor(cid)
                continue
            self.pending.discard(cid)
            host = self._host_of(cid)
            outcome = "not_placed"
            if host is not None and host in self.hosts.hosts:
                try:
                    outcomes = await self.commands.stop(
                        host, [cid], _timeout(self.child_specs[cid])
                    )
                    outcome = outcomes.get(cid, "not_running")
                except (HostUnreachable, CommandRefused) as exc:
                    outcome = f"unreachable: {exc}"
            self._emit(
                "child_stopped", self.parent[cid], cid, host=host or "", outcome=str(outcome)
            )

    async def _stop_supervisor(self, name: str) -> None:
        state = self.states.pop(name, None)
        if state is None:
            return
        await self._stop([c.id for c in reversed(state.children) if c.running])
        self._emit("child_stopped", self.parent.get(name, name), name)

    async def _kill(self, agent: str) -> None:
        host = self._host_of(agent)
        if host is None or host not in self.hosts.hosts:
            return
        try:
            await self.commands.stop(host, [agent], None)
        except (HostUnreachable, CommandRefused):
            log.warning("kill not confirmed", extra={"agent": agent, "host": host})

    # --- hosts ----------------------------------------------------------------------------

    async def _host_lost(self, host: str, restarted: bool) -> None:
        """Re-home what the host ran: its shards and pinned agents go to live hosts (or,
        when it restarted, back to its new incarnation), and its running agents start there."""
        shards = sorted(k for k, h in self.shards.items() if h == host)
        pinned = sorted(a for a, h in self.pinned.items() if h == host)
        if not restarted:
            for k in shards:
                del self.shards[k]
            for a in pinned:
                del self.pinned[a]
        moved = [
            a
            for a in self.order()
            if a in pinned or (a not in self.need and self._shard(a) in shards)
        ]
        self.events.emit_envelope(
            self._event(
                "host_lost",
                host,
                host=host,
                restarted=restarted,
                shards=shards,
                agents=moved[:1000],
                n_agents=len(moved),
            )
        )
        log.warning(
            "host lost; re-homing its agents",
            extra={"host": host, "agents": len(moved), "restarted": restarted},
        )
        await self._place(always={host} if restarted else set())
        await self._start_agents([a for a in moved if self._is_running(a)], rehome_from=host)

    async def _rebalance_to(self, host: str) -> None:
        """A host joined: it takes its fair share of shards from the most loaded hosts. The
        moved shards' running agents stop on their old host (within their shutdown, as any
        stop), the old host lets go of the shards, and the agents start on the newcomer from
        their journal and mailbox: nothing lost, and a move is not a restart. A donor that
        does not confirm the stop keeps its shards: two hosts must never serve one."""
        after = rebalance_shards(self.shards, self.hosts.live(), host)
        moving = {k: self.shards[k] for k, h in after.items() if h != self.shards.get(k)}
        if not moving:
            return
        by_donor: dict[str, list[str]] = {}
        for agent in self.order():
            shard = self._shard(agent)
            if agent not in self.need and shard in moving and self._is_running(agent):
                by_donor.setdefault(moving[shard], []).append(agent)
        for donor in sorted(set(moving.values())):
            try:
                await self._stop_for_move(donor, by_donor.get(donor, []))
            except (HostUnreachable, CommandRefused) as exc:
                log.warning("shards not moved", extra={"host": donor, "error": str(exc)})
                after.update({k: d for k, d in moving.items() if d == donor})
                by_donor.pop(donor, None)
        self.shards = after
        given = {d: sorted(k for k, h in moving.items() if h == d and after[k] == host)
                 for d in sorted(set(moving.values()))}  # fmt: skip
        await asyncio.gather(*(self._assign(d) for d, shards in given.items() if shards))
        self.events.emit_envelope(
            self._event(
                "shards_rebalanced",
                host,
                host=host,
                given={d: shards for d, shards in given.items() if shards},
                n_agents=sum(len(g) for g in by_donor.values()),
            )
        )
        await self._assign(host)
        for donor, group in by_donor.items():
            await self._start_agents(group, rehome_from=donor)

    async def _stop_for_move(self, host: str, agents: Sequence[str]) -> None:
        """Stop agents that move to another host, grouped by shutdown timeout."""
        by_timeout: dict[float | None, list[str]] = {}
        for agent in agents:
            by_timeout.setdefault(_timeout(self.child_specs[agent]), []).append(agent)
        for timeout, group in by_timeout.items():
            await self.commands.stop(host, group, timeout)

    async def _place(self, always: set[str] | frozenset[str] = frozenset()) -> None:
        """Bring shard and pinned placement onto the live hosts; tell each host whose share
        changed (and every host in `always`) exactly what it owns now."""
        live = self.hosts.live()
        before = (dict(self.shards), dict(self.pinned))
        self.shards = assign_shards(self.n_shards, self.shards, live)
        labels = self.hosts.labels()
        for agent, need in self.need.items():
            load = {h: sum(1 for p in self.pinned.values() if p == h) for h in live}
            try:
                self.pinned[agent] = place_pinned(agent, need, self.pinned.get(agent), labels, load)
            except NoEligibleHost as exc:
                self.pinned.pop(agent, None)
                log.warning("agent waits for a host", extra={"agent": agent, "error": str(exc)})
        changed = set(always) | _moved(before[0], self.shards) | _moved(before[1], self.pinned)
        targets = sorted(h for h in changed if h in live)
        await asyncio.gather(*(self._assign(h) for h in targets))

    async def _assign(self, host: str) -> None:
        shards = [k for k, h in self.shards.items() if h == host]
        pinned = [a for a, h in self.pinned.items() if h == host]
        try:
            await self.commands.assign(host, shards, pinned)
        except (HostUnreachable, CommandRefused) as exc:
            log.warning("assignment not confirmed", extra={"host": host, "error": str(exc)})

    async def _reconcile(self) -> None:
        """After taking over from the record: re-home what lived on hosts that are gone,
        give every live host what it owns now (hosts seen while standing by never 'joined'),
        and start what the record left without a host (waiting is not recorded)."""
        live = set(self.hosts.live())
        for host in sorted(set(self.shards.values()) | set(self.pinned.values())):
            if host not in live:
                await self._host_lost(host, restarted=False)
        self.pending.update(a for a in self.order() if self._host_of(a) is None)
        await self._place(always=live)
        await self._start_pending()

    # --- pools (simple_one_for_one) ---------------------------------------------------------

    async def _start_children(self, pool: str, names: Sequence[str], count: int) -> list[str]:
        """OTP's start_child on a simple_one_for_one supervisor: new instances of its
        template, appended to its children and started; names already there are skipped."""
        state = self.states.get(pool)
        if state is None:
            raise CallerError(f"pool {pool!r} is not running; restart it", Reason.INVALID_SCHEMA)
        template = self.specs[pool].children[0]
        if count:
            names = _numbered_after(state, template.id, count)
        new = [n for n in dict.fromkeys(names) if state.child(n) is None]
        for name in new:
            self.parent[name] = pool
            self.child_specs[name] = template
        base = ChildState.from_spec(template, running=True)
        added = tuple(replace(base, id=name) for name in new)
        self.states[pool] = state.with_children(state.children + added)
        await self._start_agents(new)
        return new

    async def _terminate_child(self, agent: str) -> None:
        """OTP's terminate_child on a simple_one_for_one supervisor: stop the member and
        delete it; it is not restarted, whatever its restart type."""
        pool = self.parent.get(agent)
        if pool not in self.pools:
            raise CallerError(
                f"{agent!r} is not a pool member (any more)", Reason.UNKNOWN_RECIPIENT
            )
        await self._stop([agent])
        state = self.states.get(pool)
        if state is not None:
            self.states[pool] = state.with_children(
                tuple(c for c in state.children if c.id != agent)
            )
        self._forget_member(agent)

    def _forget_member(self, agent: str) -> None:
        self.parent.pop(agent, None)
        self.child_specs.pop(agent, None)
        self.generations.pop(agent, None)
        self.restarts.pop(agent, None)
        self._shards_of.pop(agent, None)
        self.addenda.pop(agent, None)
        self.suspended.pop(agent, None)
        self.pending.discard(agent)

    # --- operators --------------------------------------------------------------------------

    async def _operate(self, op: Operate) -> None:
        self._emit(
            "operator_command",
            self.parent.get(op.target, op.target),
            op.target,
            command=op.command,
            requested_by=op.requested_by,
        )
        if op.command == "kill":
            await self._kill(op.target)
            await self._child_exited(
                self.parent[op.target], op.target, Exit(ExitReason.CRASH, "killed")
            )
            return
        # restart: stop (gracefully) if running, start a fresh incarnation; OTP's
        # terminate_child + restart_child, which does not count against intensity
        parent = self.parent.get(op.target)
        self.suspended.pop(op.target, None)  # the operator's restart overrides the loop guard's
        if parent is not None and parent in self.states:
            self.states[parent] = _mark_running(self.states[parent], op.target)
        if op.target in self.specs:
            await self._stop_supervisor(op.target)
            await self._start_supervisor(op.target, parent)
        else:
            await self._stop([op.target])
            await self._start([op.target])

    # --- views -------------------------------------------------------------------------------

    def host_of(self, agent: str) -> str | None:
        return self._host_of(agent)

    def child_view(self, cid: str) -> dict[str, Any]:
        sup = self.parent.get(cid)
        state = self.states.get(sup) if sup else None
        child = state.child(cid) if state else None
        if cid in self.specs:
            status = "running" if cid in self.states else "dead"
        elif state is None:
            status = "dead"
        elif child is None:
            status = "removed"
        elif not child.running:
            status = "suspended" if cid in self.suspended else "stopped"
        elif cid in self.pending:
            status = "restarting"
        else:
            status = "running"
        return {
            "supervisor": sup,
            "supervised": status,
            "generation": self.generations.get(cid, 0),
            "restarts": self.restarts.get(cid, 0),
            "host": self._host_of(cid),
            "isolation": "process" if cid in self.isolated else "task",
        }

    def tree(self) -> dict[str, Any]:
        def node(name: str) -> dict[str, Any]:
            spec = self.specs[name]
            state = self.states.get(name)
            now = self.clock()
            children: list[dict[str, Any]] = []
            if name in self.pools:  # its members, not its template
                children = [
                    {"agent": c.id, "restart": c.restart.value, **self.child_view(c.id)}
                    for c in (state.children if state else ())
                ]
            for child in spec.children if name not in self.pools else ():
                if child.supervisor is not None:
                    children.append(node(child.supervisor))
                else:
                    children.append(
                        {
                            "agent": child.id,
                            "restart": child.restart.value,
                            **self.child_view(child.id),
                        }
                    )
            return {
                "supervisor": name,
                "strategy": spec.strategy.value,
                "intensity": spec.intensity,
                "period": spec.period,
                "up": state is not None,
                "recent_restarts": state.window.recent(now) if state else 0,
                "template": self.pools.get(name),  # a pool's: what its members instantiate
                "children": children,
            }

        return node(self.root) if self.root else {}

    def snapshot(self) -> record.TreeRecord:
        return record.TreeRecord(
            term=self.commands.term,
            supervisors={
                name: record.SupervisorRecord(
                    running={c.id: c.running for c in st.children}, restarts=st.window.restarts
                )
                for name, st in self.states.items()
            },
            generations=dict(self.generations),
            restarts=dict(self.restarts),
            shards=dict(self.shards),
            pinned=dict(self.pinned),
            addenda=dict(self.addenda),
            suspended=dict(self.suspended),
        )

    # --- helpers ------------------------------------------------------------------------------

    def _restore(self, saved: record.TreeRecord) -> bool:
        """Adopt a recorded tree if it is this deployment's; False if it is not."""
        for name, sup in saved.supervisors.items():
            spec = self.specs.get(name)
            if spec is None or any(not self._may_run_under(spec, c) for c in sup.running):
                log.warning(
                    "recorded tree is another deployment's; starting afresh",
                    extra={"supervisor": name},
                )
                return False
        for name, sup in saved.supervisors.items():
            spec = self.specs[name]
            if name in self.pools:
                template = spec.children[0]
                for member in sup.running:
                    self.parent[member], self.child_specs[member] = name, template
                children = tuple(
                    replace(ChildState.from_spec(template, up), id=member)
                    for member, up in sup.running.items()
                )
            else:
                children = tuple(
                    ChildState.from_spec(c, sup.running[c.id])
                    for c in spec.children
                    if c.id in sup.running
                )
            window = RestartIntensity(spec.intensity, spec.period, sup.restarts)
            self.states[name] = SupervisorState(name, spec.strategy, children, window)
        self.generations = dict(saved.generations)
        self.restarts = dict(saved.restarts)
        self.shards = {int(k): h for k, h in saved.shards.items()}
        self.pinned = dict(saved.pinned)
        self.addenda = dict(saved.addenda)
        self.suspended = dict(saved.suspended)
        return True

    def _may_run_under(self, spec: SupervisorSpec, child: str) -> bool:
        if spec.name in self.pools:
            return pool_template(child, {self.pools[spec.name]}) is not None
        return any(c.id == child for c in spec.children)

    def order(self) -> list[str]:
        """Every supervised agent, in start order: the declared ones, and each pool's
        members as they were started."""
        out: list[str] = []

        def walk(name: str) -> None:
            if name in self.pools:
                pool = self.states.get(name)
                if pool is not None:
                    out.extend(c.id for c in pool.children)
                return
            for child in self.specs[name].children:
                if child.supervisor is not None:
                    walk(child.supervisor)
                else:
                    out.append(child.id)

        if self.root is not None:
            walk(self.root)
        return out

    def _shard(self, agent: str) -> int:
        k = self._shards_of.get(agent)
        if k is None:
            k = self._shards_of[agent] = subjects.shard_of(agent, self.n_shards)
        return k

    def _host_of(self, agent: str) -> str | None:
        if agent in self.need:
            return self.pinned.get(agent)
        return self.shards.get(self._shard(agent))

    def _is_running(self, cid: str) -> bool:
        sup = self.parent.get(cid)
        state = self.states.get(sup) if sup else None
        child = state.child(cid) if state else None
        return child is not None and child.running

    def _changed(self) -> None:
        self._dirty.set()

    def _event(self, name: str, recipient: str, **data: Any) -> Envelope:
        return event_envelope(
            SOURCE, name, data, recipient=recipient, conversation_id=self.root or SOURCE
        )

    def _emit_bulk(self, agents: Sequence[str], host: str, rehome_from: str | None) -> None:
        by_sup: dict[str, list[str]] = {}
        for agent in agents:
            by_sup.setdefault(self.parent[agent], []).append(agent)
        name = "children_rehomed" if rehome_from is not None else "children_started"
        for sup, children in by_sup.items():
            self._emit(
                name,
                sup,
                sup,
                host=host,
                from_host=rehome_from or "",
                n=len(children),
                children=children[:BULK_EVENT_NAMES],
            )

    def _emit(self, name: str, sup: str, child: str, **data: Any) -> None:
        env = event_envelope(
            SOURCE,
            name,
            {"supervisor": sup, "child": child, **data},
            recipient=child,
            conversation_id=sup,
        )
        self.events.emit_envelope(env)
        log.info(name.replace("_", " "), extra={"supervisor": sup, "child": child, **data})


def _numbered_after(state: SupervisorState, template: str, count: int) -> list[str]:
    """`count` member names numbered after the highest numbered member of the pool."""
    prefix = f"{template}-"
    numbers = [int(tail) for c in state.children if (tail := c.id[len(prefix) :]).isdigit()]
    first = max(numbers, default=0) + 1
    return [member_name(template, str(n)) for n in range(first, first + count)]


def _timeout(spec: ChildSpec) -> float | None:
    shutdown = spec.shutdown_or_default
    if shutdown == BRUTAL_KILL:
        return None
    if shutdown == INFINITY:
        return INFINITY_S
    return float(shutdown)


def _moved(old: Mapping[Any, str], new: Mapping[Any, str]) -> set[str]:
    """The hosts that gained or lost something between two placements."""
    hosts: set[str] = set()
    for key in old.keys() | new.keys():
        before, after = old.get(key), new.get(key)
        if before != after:
            hosts.update(h for h in (before, after) if h)
    return hosts


def _mark_running(state: SupervisorState, child_id: str) -> SupervisorState:
    return _mark(state, child_id, running=True)


def _mark(state: SupervisorState, child_id: str, running: bool) -> SupervisorState:
    known = state.child(child_id)
    if known is None:
        return state
    return state.with_children(
        tuple(replace(c, running=running) if c.id == child_id else c for c in state.children)
    )


def _text(command: GuardCommand) -> str | None:
    return command.addendum.text if command.addendum is not None else None
