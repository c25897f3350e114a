"""The loop guard's NATS shell: journal entries into the detector, loops up the ladder, and
the ladder's commands to the supervisor; escalations out to humans, their answers in.

    BL_JOURNAL, durable consumer `loopguard`   every agent's steps, in order, no acks
                                               (`beamline.feed`, position in `PositionStore`)
    bl.sup.guard        (request to the supervisor) restart | suspend | resume | stop;
                        sent in order, re-sent until the leader answers
    bl.escalation.<agent>                       escalation_opened / escalation_closed
    bl.loopguard.list | answer  (operator)      open escalations; a human's answer
    bl.events.loopguard.loop_detected | guard_refused

Every change of state is persisted (`GuardStore`) before it is acted on, under one lock.
The journal position moves past a loop's entry only once its command is carried out and
the stale entries of the looping incarnation are fenced off, so a restart of this service
reads that entry again and redoes what was unfinished (with the same ids: nothing is done
twice). A loop completed before the agent's latest decided one was decided in an earlier
life, and is not decided again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from beamline import bus, config, nats_auth, streams, subjects
from beamline.config import Deployment
from beamline.envelope import Envelope, EventPayload, Kind
from beamline.errors import CallerError, Reason
from beamline.events import EventSink
from beamline.feed import Feed
from beamline.guard import (
    AnswerRequest,
    Escalation,
    GuardCommand,
    GuardReply,
    ListRequest,
    Loop,
    LoopGuard,
    LoopguardReply,
)
from beamline.ids import derived_id
from beamline.journal import ENTRY_MAX_BYTES
from beamline.requests import parse_request
from beamline.service import answer_health, crash_on_error, every
from beamline.settings import MeshSettings
from services.loopguard.conversations import Conversations
from services.loopguard.detector import counted, observe
from services.loopguard.ladder import (
    AgentLadder,
    Decision,
    GuardState,
    close,
    decide,
    due,
    escalation_id,
    prune,
)
from services.loopguard.settings import LoopguardSettings
from services.loopguard.store import GuardStore, PositionStore

log = logging.getLogger("beamline.loopguard")

SERVICE = "loopguard"
REQUEST_MAX_BYTES = 64 * 1024


class LoopguardService:
    def __init__(
        self,
        settings: LoopguardSettings,
        deployment: Deployment,
        nc: NATS,
        store: GuardStore,
        state: GuardState,
        positions: PositionStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.deployment, self.nc = settings, deployment, nc
        self.store, self.state, self.clock = store, state, clock
        self.js = nc.jetstream()
        self.events = EventSink(self.js, SERVICE)
        self.conversations = Conversations(self.js, settings.conversations)
        self.positions = positions
        self.feed = Feed(
            self.js,
            stream=subjects.STREAM_JOURNAL,
            consumer=subjects.CONSUMER_LOOPGUARD,
            filter_subject=subjects.JOURNAL_ALL,
            what="journal entries",
            batch=settings.fetch_batch,
            linger_s=settings.linger_s,
            retry_s=settings.retry_s,
            failed=self._failed,
        )
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()  # a command was queued
        self._waiters: dict[str, asyncio.Future[GuardReply]] = {}
        self._subs: list[Subscription] = []
        self._loops: list[asyncio.Task[None]] = []
        self.counts = {"entries": 0, "loops": 0, "sent": 0, "refused": 0, "answered": 0}
        self.last_error: str | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.events.start()
        kept = await self.positions.position()
        await self.feed.open(kept)
        if kept is not None and self.feed.seq < kept:  # BL_JOURNAL made again: sequence reset
            self.state.agents = {a: ladder.renumbered() for a, ladder in self.state.agents.items()}
            await self._save()
        await self.positions.keep(self.feed.seq)  # a first start's, at once
        self._subs.append(
            await self.nc.subscribe(
                subjects.LOOPGUARD_ALL, queue=subjects.QUEUE_LOOPGUARD, cb=self.on_request
            )
        )
        self._subs.append(await answer_health(self.nc, SERVICE, self.status))
        for name, loop in (
            ("watch", self.feed.run(self._on_batch)),
            (
                "position",
                every(
                    self.settings.position_flush_s,
                    self._keep_position,
                    "journal position not saved",
                    self._failed,
                ),
            ),
            ("send", self._send_loop()),
            (
                "deadlines",
                every(
                    self.settings.tick_s,
                    lambda: self._time_out(self.clock()),
                    "escalation deadlines not applied",
                    self._failed,
                ),
            ),
        ):
            task = asyncio.create_task(loop, name=name)
            task.add_done_callback(crash_on_error)
            self._loops.append(task)
        self._wake.set()  # commands persisted but not acknowledged before a restart
        log.info("watching", extra={"open_escalations": len(self.state.open_escalations())})

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        with contextlib.suppress(Exception):  # else a restart reads a little more again
            await self._keep_position()
        await self.events.close(timeout=5.0)

    def status(self) -> dict[str, Any]:
        return {
            "revision": self.store.revision,
            "agents": len(self.state.agents),
            "open_escalations": len(self.state.open_escalations()),
            "outbox": len(self.state.outbox),
            "conversations": len(self.conversations),
            "replayed": self.conversations.replayed,
            "position": self.feed.seq,
            "reopened": self.feed.reopened,
            "events_dropped": self.events.dropped,
            "last_error": self.last_error,
            **self.counts,
        }

    # --- the journal ----------------------------------------------------------------------

    async def _on_batch(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            await self._on_entry(msg)
            self.feed.done(msg)

    async def _keep_position(self) -> None:
        await self.positions.keep(self.feed.seq)

    def _failed(self, error: str) -> None:
        self.last_error = error

    async def _on_entry(self, msg: Msg) -> None:
        self.counts["entries"] += 1
        seq = msg.metadata.sequence.stream
        tokens = msg.subject.split(".")
        if len(tokens) != 4:
            return
        agent, conversation = tokens[2], tokens[3]
        guard = self.deployment.loop_guard(agent)
        if guard is None:
            return
        ladder = self.state.agents.get(agent, AgentLadder())
        if ladder.skipped(seq):
            return  # written by an incarnation the guard had already acted on
        # first, whatever its kind: a conversation met at its first entry (the agent says so
        # in Bl-Entry) needs no read at all, one met later is replayed up to this entry
        headers = msg.headers or {}
        first = headers.get(subjects.H_ENTRY) == "0"
        watch = await self.conversations.watch(agent, conversation, seq, guard, ladder, first)
        if not counted(guard, headers.get(subjects.H_KIND)):
            return
        try:
            entry = bus.decode(msg.data, ENTRY_MAX_BYTES)
        except CallerError as exc:
            log.warning("journal entry unreadable; skipped", extra={"seq": seq, "error": str(exc)})
            return
        loop = observe(guard, watch, entry)
        if seq < ladder.last_loop_seq:
            return  # read again after a restart: its loop, if any, was decided back then
        if ladder.last_loop_seq == seq and ladder.last_loop is not None:
            # read again: the loop it completed was decided before (this service restarted,
            # or NATS failed half-way); carry it on unless it was carried out
            if ladder.carried_out(seq):
                return
            loop = ladder.last_loop
        if loop is not None:
            await self._on_loop(agent, entry, seq, loop, guard)

    async def _on_loop(
        self, agent: str, entry: Envelope, seq: int, loop: Loop, guard: LoopGuard
    ) -> None:
        async with self._lock:
            ladder = self.state.agents.get(agent, AgentLadder())
            if ladder.last_loop_seq == seq:  # decided before a restart of this service
                decision = self._decided(agent, seq, ladder)
            else:
                decision = decide(
                    guard,
                    ladder,
                    loop,
                    agent=agent,
                    conversation_id=entry.conversation_id,
                    seq=seq,
                    now=self.clock(),
                    supervised=self.deployment.is_supervised(agent),
                    trace_id=entry.trace_id,
                )
                self._apply(agent, decision)
                await self._save()
        self.counts["loops"] += 1
        self.events.emit_envelope(_loop_event(agent, entry, seq, loop, decision))
        log.warning(
            "loop detected",
            extra={
                "trace_id": entry.trace_id,
                "agent": agent,
                "kind": loop.kind.value,
                "count": loop.count,
                "rung": decision.rung.value if decision.rung else None,
            },
        )
        if decision.rung is None:
            return  # recorded only
        if decision.escalation is not None:
            # at once: the suspend goes first in the outbox, so an answer can only follow it
            await self._publish_escalation("escalation_opened", decision.escalation)
        if decision.command is not None:
            await self._carried_out(decision.command.id)
        # what the looping incarnation wrote until it was stopped is not counted again
        last = (await self.js.stream_info(subjects.STREAM_JOURNAL)).state.last_seq
        async with self._lock:
            self.state.agents[agent] = self.state.agents[agent].fenced(seq, last)
            await self._save()

    def _decided(self, agent: str, seq: int, ladder: AgentLadder) -> Decision:
        """The decision taken for this entry before a restart, to carry on with: its command
        if still unanswered, its escalation if it opened one."""
        command = next((c for c in self.state.outbox if c.id == ladder.last_command), None)
        escalation = self.state.escalations.get(escalation_id(agent, seq))
        return Decision(ladder.last_rung, ladder, command, escalation)

    def _apply(self, agent: str, decision: Decision) -> None:
        self.state.agents[agent] = decision.ladder
        if decision.escalation is not None:
            self.state.escalations[decision.escalation.id] = decision.escalation
        if decision.command is not None:
            self._queue(decision.command)

    # --- commands to the supervisor ----------------------------------------------------------

    def _queue(self, command: GuardCommand) -> asyncio.Future[GuardReply]:
        """Under the lock, persisted by the caller: the send loop delivers it in turn; the
        future gets the supervisor's answer."""
        self.state.outbox.append(command)
        self._wake.set()
        return self._waiter(command.id)

    def _waiter(self, command_id: str) -> asyncio.Future[GuardReply]:
        return self._waiters.setdefault(command_id, asyncio.get_running_loop().create_future())

    async def _carried_out(self, command_id: str) -> GuardReply | None:
        """Wait until the supervisor has answered `command_id` (at once if it has)."""
        if not self.state.queued(command_id):
            return None
        return await asyncio.shield(self._waiter(command_id))

    async def _send_loop(self) -> None:
        while True:
            if not self.state.outbox:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.retry_s)
                continue
            command = self.state.outbox[0]
            reply = await self._send(command)
            if reply is None:
                await asyncio.sleep(self.settings.retry_s)
                continue
            async with self._lock:
                self.state.outbox = [c for c in self.state.outbox if c.id != command.id]
                with contextlib.suppress(Exception):  # saved with the next change, or re-sent
                    await self._save()  # after a restart: the supervisor knows its id
            waiter = self._waiters.pop(command.id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(reply)

    async def _send(self, command: GuardCommand) -> GuardReply | None:
        """The supervisor's answer; None when it should be sent again (no leader answered,
        or it failed to carry it out)."""
        try:
            msg = await self.nc.request(
                subjects.GUARD,
                command.model_dump_json().encode(),
                timeout=self.settings.supervisor_timeout_s,
            )
            reply = GuardReply.model_validate_json(msg.data)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, ValidationError) as exc:
            self.last_error = f"no supervisor answered {command.action.value} {command.agent}"
            log.warning(
                "guard command not answered; will re-send",
                extra={"agent": command.agent, "action": command.action.value, "error": repr(exc)},
            )
            return None
        if reply.ok:
            self.counts["sent"] += 1
            log.info(
                "guard command carried out",
                extra={
                    "agent": command.agent,
                    "action": command.action.value,
                    "state": reply.state,
                },
            )
            return reply
        if reply.reason is None:  # it failed on the supervisor's side: try again
            self.last_error = f"{command.action.value} {command.agent}: {reply.error}"
            return None
        self.counts["refused"] += 1
        self.last_error = f"{command.action.value} {command.agent} refused: {reply.error}"
        log.error("the supervisor refused a guard command", extra={"error": reply.error})
        self.events.emit(
            "guard_refused",
            {"agent": command.agent, "action": command.action.value, "command": command.id,
             "error": reply.error, "reason": reply.reason},
        )  # fmt: skip
        return reply

    # --- escalations -------------------------------------------------------------------------

    async def _time_out(self, now: float) -> None:
        closed: list[Escalation] = []
        async with self._lock:
            for escalation in due(self.state, now):
                done, command = close(
                    escalation, escalation.on_timeout, now, by="timeout", timed_out=True
                )
                self.state.escalations[done.id] = done
                self._queue(command)
                closed.append(done)
            if closed:
                prune(self.state)
                await self._save()
        for done in closed:
            log.warning(
                "escalation timed out", extra={"id": done.id, "outcome": done.on_timeout.value}
            )
            await self._publish_escalation("escalation_closed", done)

    async def _publish_escalation(self, name: str, escalation: Escalation) -> None:
        fields: dict[str, Any] = {"trace_id": escalation.trace_id} if escalation.trace_id else {}
        env = Envelope(
            id=derived_id("escalation", escalation.id, name),
            kind=Kind.EVENT,
            sender=SERVICE,
            recipient=escalation.agent,
            conversation_id=escalation.conversation_id,
            payload=EventPayload(name=name, data=escalation.model_dump(mode="json")),
            **fields,
        )
        for attempt in range(3):
            try:
                await bus.publish(self.js, subjects.escalation(escalation.agent), env)
                return
            except Exception as exc:  # NATS reconnecting; the state holds it either way
                self.last_error = f"{name} {escalation.id} not published: {exc!r}"
                await asyncio.sleep(0.5 * (attempt + 1))
        log.error("escalation message not published", extra={"id": escalation.id, "name": name})

    # --- requests ------------------------------------------------------------------------------

    async def on_request(self, msg: Msg) -> None:
        command = subjects.last_token(msg.subject, -1)
        try:
            bus.check_size(msg.data, REQUEST_MAX_BYTES)
            if command == "list":
                reply = self._list(parse_request(ListRequest, msg.data))
            elif command == "answer":
                reply = await self._answer(parse_request(AnswerRequest, msg.data))
            else:
                raise CallerError(
                    f"unknown command {msg.subject!r}: bl.loopguard.list | bl.loopguard.answer",
                    Reason.INVALID_SCHEMA,
                )
        except CallerError as exc:
            self.last_error = exc.message
            log.info("request refused", extra={"subject": msg.subject, "error": exc.message})
            reply = LoopguardReply(ok=False, reason=exc.reason.value, error=exc.message)
        except Exception as exc:  # the state could not be persisted (NATS, JetStream down)
            self.last_error = f"{msg.subject}: {exc!r}"
            log.exception("request failed", extra={"subject": msg.subject})
            reply = LoopguardReply(
                ok=False,
                reason=Reason.NATS_UNAVAILABLE.value,
                error=f"the loop guard's state could not be persisted ({exc!r}); nothing changed",
            )
        if msg.reply:
            await msg.respond(reply.model_dump_json(exclude_none=True).encode())

    def _list(self, request: ListRequest) -> LoopguardReply:
        if request.agent is not None:
            self._known(request.agent)
        found = [
            e
            for e in self.state.escalations.values()
            if (request.include_closed or e.status.value == "open")
            and request.agent in (None, e.agent)
        ]
        found.sort(key=lambda e: e.opened_at)
        return LoopguardReply(result={"escalations": [e.model_dump(mode="json") for e in found]})

    async def _answer(self, request: AnswerRequest) -> LoopguardReply:
        if request.agent is not None:
            self._known(request.agent)
        async with self._lock:
            escalation = self.state.escalations.get(request.id)
            if escalation is None or request.agent not in (None, escalation.agent):
                raise CallerError(
                    f"no escalation {request.id!r}"
                    + (f" for agent {request.agent!r}" if request.agent else "")
                    + ": `beamline escalation list` shows the open ones",
                    Reason.UNKNOWN_RECIPIENT,
                )
            if escalation.status.value != "open":
                raise CallerError(
                    f"escalation {request.id!r} is already closed ({escalation.status.value}: "
                    f"{escalation.outcome.value if escalation.outcome else '-'} by "
                    f"{escalation.answered_by})",
                    Reason.INVALID_SCHEMA,
                )
            done, command = close(
                escalation, request.action, self.clock(), by=request.answered_by, say=request.say
            )
            self.state.escalations[done.id] = done
            carried_out = self._queue(command)
            prune(self.state)
            await self._save()
        self.counts["answered"] += 1
        log.info(
            "escalation answered",
            extra={"id": done.id, "outcome": request.action.value, "by": request.answered_by},
        )
        await self._publish_escalation("escalation_closed", done)
        result: dict[str, Any] = {"escalation": done.model_dump(mode="json")}
        try:
            reply = await asyncio.wait_for(asyncio.shield(carried_out), self.settings.answer_wait_s)
        except TimeoutError:
            result["agent_state"] = "pending: the supervisor will carry it out when it answers"
        else:
            result["agent_state"] = reply.state if reply.ok else f"refused: {reply.error}"
        return LoopguardReply(result=result)

    def _known(self, agent: str) -> None:
        if self.deployment.member_spec(agent) is None:
            raise CallerError(
                f"no agent named {agent!r} in this deployment", Reason.UNKNOWN_RECIPIENT
            )

    # --- helpers ------------------------------------------------------------------------------

    async def _save(self) -> None:
        await self.store.save_or_exit(self.state)


def _loop_event(agent: str, entry: Envelope, seq: int, loop: Loop, decision: Decision) -> Envelope:
    """In the looping task's trace and conversation, so `beamline trace` shows it; one id
    per loop, so a redone decision is one event."""
    return entry.child(
        EventPayload(
            name="loop_detected",
            data={
                "agent": agent,
                "conversation": entry.conversation_id,
                **loop.model_dump(mode="json"),
                "rung": decision.rung.value if decision.rung else None,
                "acted": decision.command is not None,
                "command": decision.command.action.value if decision.command else None,
                "escalation": decision.escalation.id if decision.escalation else None,
                "seq": seq,
                "entry": entry.id,
            },
        ),
        id=derived_id("loop_detected", agent, str(seq)),
        sender=SERVICE,
        recipient=agent,
    )


async def main(stop: asyncio.Event) -> None:
    mesh, settings = MeshSettings(), LoopguardSettings()
    deployment = config.load(mesh.config)  # a bad file stops us here, before connecting
    nc = await bus.connect(mesh.nats_url, SERVICE)
    try:
        js = nc.jetstream()
        await streams.require_layout(
            js, nats_auth.USES[nats_auth.Role.LOOPGUARD], mesh.layout_wait_s
        )
        kv = await js.key_value(subjects.BUCKET_LOOPGUARD)
        store = GuardStore(kv)
        service = LoopguardService(
            settings, deployment, nc, store, await store.load(), PositionStore(kv)
        )
        await service.start()
        await stop.wait()
        log.info("stopping: no new entries")
        await service.stop()
    finally:
        await bus.drain(nc)
