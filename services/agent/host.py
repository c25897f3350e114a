"""The host: which agents run here, which mailboxes feed them, and their lifecycle as
commanded by the supervisor.

Agents that a supervisor names run only between its `start` and `stop`; their messages
wait in their queue meanwhile (unacknowledged: nothing is lost). Agents no supervisor
names run from the start, as without supervision. Mailboxes: the shards this host owns
(all of them without a supervisor; the supervisor's assignment with one), plus one
consumer per pinned agent (an agent with placement labels) placed here. A process-isolated
agent placed here is a `ProcessAgent`: its own process opens its mailbox consumer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from beamline import subjects
from beamline.config import Deployment
from beamline.control import AgentState, ChildExit, HostHeartbeat, StopOutcome
from beamline.errors import CallerError, Reason
from beamline.guard import Addendum
from beamline.ids import new_span_id
from beamline.tree import pool_template
from services.agent.isolated import Launch, ProcessAgent
from services.agent.mailbox import Mailbox, MailboxAck, MailboxConsumer
from services.agent.runner import Agent, HostContext
from services.agent.settings import AgentHostSettings

log = logging.getLogger("beamline.agent.host")

MAX_BUSY_IN_HEARTBEAT = 200
EXIT_REPORT_TRIES = 60  # ~30 s of retries: a supervisor failing over takes < 2 s

AnyAgent = Agent | ProcessAgent


class Host:
    def __init__(
        self,
        ctx: HostContext,
        deployment: Deployment,
        settings: AgentHostSettings,
        max_bytes: int,
        total_shards: int,
    ) -> None:
        self.ctx, self.settings, self.max_bytes = ctx, settings, max_bytes
        self.total_shards = total_shards
        self.id = settings.host_id
        self.incarnation = new_span_id()
        self.labels = settings.label_map()
        self.deployment = deployment
        self.supervised = deployment.supervised_agents()
        self.pinned_names = frozenset(deployment.pinned_agents())
        self.isolated_names = deployment.isolated_agents()
        self.templates = frozenset(deployment.pools().values())
        self.agents: dict[str, AnyAgent] = {}
        launch = Launch(self.id)
        for spec in deployment.agents:
            if spec.name in self.templates:
                continue  # a pool's template never runs; its members do
            if spec.name in self.isolated_names:  # always supervised (config checks it)
                self.agents[spec.name] = ProcessAgent(spec, launch, on_exit=self._report_exit)
                continue
            agent = Agent(spec, ctx, running=spec.name not in self.supervised)
            if spec.name in self.supervised:
                agent.on_exit = self._report_exit
                agent.state = AgentState.STOPPED
            self.agents[spec.name] = agent
        self.shards: dict[int, MailboxConsumer] = {}
        self.pinned: dict[str, MailboxConsumer] = {}
        self.isolated_here: frozenset[str] = frozenset()  # their processes hold their mailboxes
        self.term = 0
        self.taking = True
        self._reports: set[asyncio.Task[None]] = set()
        # crash -> successor started, per restart (ms), shown in the health status
        self.restart_ms: deque[float] = deque(maxlen=10_000)

    # --- mailboxes ------------------------------------------------------------------

    async def assign(self, shards: Iterable[int], pinned: Iterable[str] = ()) -> None:
        """Own exactly these shards and pinned mailboxes from now on."""
        wanted = set(pinned)
        unknown = sorted(wanted - self.pinned_names)
        if unknown:
            raise CallerError(
                f"not pinned agents of this deployment: {unknown}", Reason.UNKNOWN_RECIPIENT
            )
        await self._converge(self.shards, {k: Mailbox.shard(self.id, k) for k in shards})
        own = {a: Mailbox.pinned(self.id, a) for a in wanted if a not in self.isolated_names}
        await self._converge(self.pinned, own)
        self.isolated_here = frozenset(wanted & self.isolated_names)
        # a supervised agent whose mailbox moved away runs elsewhere now (after a partition,
        # say): this stale incarnation must not keep working
        for name, agent in list(self.agents.items()):
            if self.is_supervised(name) and agent.running and not self.serves(name):
                await agent.halt(None)

    def serves(self, agent: str) -> bool:
        """Whether one of this host's mailboxes feeds `agent`."""
        if agent in self.isolated_names:
            return agent in self.isolated_here
        if agent in self.pinned_names:
            return agent in self.pinned
        return subjects.shard_of(agent, self.total_shards) in self.shards

    async def _converge(self, have: dict[Any, MailboxConsumer], want: dict[Any, Mailbox]) -> None:
        for key in [k for k in have if k not in want]:
            shard = have.pop(key)
            await shard.stop_taking()
            self._forget_queued(shard)
            log.info("mailbox released", extra={"host": self.id, "consumer": shard.name})
        for key, mailbox in want.items():
            if key in have:
                continue
            elsewhere = self.pinned_names if isinstance(key, int) else ()
            shard = MailboxConsumer(
                self.ctx.js, mailbox, self.recipient, self.settings, self.max_bytes, elsewhere
            )
            await shard.open()
            if self.taking:
                await shard.start()
            have[key] = shard

    def _forget_queued(self, shard: MailboxConsumer) -> None:
        """Drop waiting deliveries of a released mailbox: its new owner has them now."""
        for agent in self.agents.values():
            for delivery in list(agent.queue)[1 if agent.busy else 0 :]:
                if isinstance(delivery.msg, MailboxAck) and delivery.msg.shard is shard:
                    agent.queue.remove(delivery)

    def mailboxes(self) -> list[MailboxConsumer]:
        return [*self.shards.values(), *self.pinned.values()]

    # --- the supervisor's commands ----------------------------------------------------

    def obey(self, term: int) -> None:
        """Commands from a deposed leader (an older term) are refused."""
        if term < self.term:
            raise CallerError(
                f"command from leader term {term}, but term {self.term} already leads",
                Reason.INVALID_SCHEMA,
            )
        self.term = term

    def recipient(self, name: str) -> AnyAgent | None:
        """The agent a mailbox message is for. A pool member not started here yet gets a
        stopped one, whose queue holds the message until its supervisor starts it."""
        agent = self.agents.get(name)
        if agent is None and pool_template(name, self.templates) is not None:
            spec = self.deployment.member_spec(name)
            assert spec is not None
            agent = Agent(spec, self.ctx, name, running=False, on_exit=self._report_exit)
            agent.state = AgentState.STOPPED
            self.agents[name] = agent
        return agent

    def agent(self, name: str) -> AnyAgent:
        agent = self.recipient(name)
        if agent is None:
            raise CallerError(f"no agent named {name!r} is declared", Reason.UNKNOWN_RECIPIENT)
        return agent

    def is_supervised(self, name: str) -> bool:
        return name in self.supervised or pool_template(name, self.templates) is not None

    def _forget_idle_member(self, name: str) -> None:
        """A stopped pool member with nothing queued is dropped (terminate_child, or its
        pool gave up): a pool that shrinks gives its memory back."""
        agent = self.agents.get(name)
        if (
            agent is not None
            and pool_template(name, self.templates) is not None
            and not agent.running
            and not agent.busy
            and not agent.queue
        ):
            del self.agents[name]

    def start(
        self,
        names: Iterable[str],
        generations: Iterable[int],
        addenda: Mapping[str, Addendum] | None = None,
    ) -> None:
        """Start a new incarnation of each agent, in order; it inherits the queue, and gets
        the loop guard's addendum to its system prompt when its supervisor sends one."""
        addenda = addenda or {}
        names = list(names)
        elsewhere = [n for n in names if n in self.isolated_names and n not in self.isolated_here]
        if elsewhere:  # its process would take its mailbox over from wherever it is assigned
            raise CallerError(
                f"agents {elsewhere} run in their own processes, which consume their mailboxes:"
                " assign them to this host before starting them",
                Reason.INVALID_SCHEMA,
            )
        for name, generation in zip(names, generations, strict=True):
            old = self.agent(name)
            if old.running and old.generation == generation:
                continue  # a repeated command (the supervisor retried): already started
            if old.busy:
                raise CallerError(
                    f"agent {name!r} is still running; stop it first", Reason.INVALID_SCHEMA
                )
            self.ctx.journal.forget(name)  # the new incarnation rebuilds from the stream
            new = old.successor(generation)
            if old.crashed_at is not None:
                self.restart_ms.append((time.monotonic() - old.crashed_at) * 1000)
            self.agents[name] = new
            new.addendum = addenda.get(name)
            new.running = True
            new.state = AgentState.IDLE
            new.kick()

    async def stop(self, names: Iterable[str], timeout: float | None) -> dict[str, StopOutcome]:
        """Stop each agent in the given order: gracefully within `timeout`, else killed."""
        outcomes: dict[str, StopOutcome] = {}
        for name in names:
            agent = self.agent(name)
            if agent.running or agent.busy:
                outcomes[name] = await agent.halt(timeout)
            else:
                outcomes[name] = StopOutcome.NOT_RUNNING
            self._forget_idle_member(name)
        return outcomes

    # --- reports to the supervisor ----------------------------------------------------

    def heartbeat(self, interval_s: float) -> HostHeartbeat:
        busy = [a.beat() for a in self.agents.values() if a.busy or a.state is AgentState.DEAD]
        return HostHeartbeat(
            host=self.id,
            incarnation=self.incarnation,
            labels=self.labels,
            shards=tuple(sorted(self.shards)),
            agents_running=sum(1 for a in self.agents.values() if a.running),
            busy=tuple(busy[:MAX_BUSY_IN_HEARTBEAT]),
            term=self.term,
            interval_s=interval_s,
        )

    def _report_exit(self, agent: AnyAgent, exit: str) -> None:
        report = ChildExit(host=self.id, agent=agent.name, generation=agent.generation, exit=exit)
        task = asyncio.create_task(self._send_exit(report), name=f"exit:{agent.name}")
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _send_exit(self, report: ChildExit) -> None:
        """At least once: the supervisor ignores an exit of an incarnation it already
        replaced, so a repeat is harmless; a lost one would leave the agent dead."""
        for _ in range(EXIT_REPORT_TRIES):
            try:
                await self.ctx.nc.request(
                    subjects.CHILD_EXIT, report.model_dump_json().encode(), timeout=0.5
                )
                return
            except Exception:  # no supervisor yet (failing over): the heartbeat shows it dead
                await asyncio.sleep(0.5)
        log.error("child exit never acknowledged by a supervisor", extra=report.model_dump())
