"""The host's side of the control plane: the supervisor's commands on `bl.ctl.<host>.*`,
and heartbeats on `bl.sup.hb.<host>`.

Commands are handled one at a time, in arrival order (a start must not overtake the stop
before it). Bad commands get `ok: false` with the reason; the host never crashes on one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from beamline import subjects
from beamline.control import (
    AgentsQuery,
    AssignShards,
    ControlReply,
    StartAgents,
    StopAgents,
    parse,
)
from beamline.envelope import Envelope
from beamline.errors import CallerError
from services.agent.host import AnyAgent, Host
from services.agent.isolated import ProcessAgent
from services.agent.pipe import holding

log = logging.getLogger("beamline.agent.control")


class Control:
    def __init__(self, nc: NATS, host: Host) -> None:
        self.nc, self.host = nc, host
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(subjects.control_all(self.host.id), cb=self._queue.put)
        self._tasks = [
            asyncio.create_task(self._serve(), name="control"),
            asyncio.create_task(self._beat(), name="heartbeat"),
        ]

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _beat(self) -> None:
        interval = self.host.settings.heartbeat_s
        subject = subjects.heartbeat(self.host.id)
        while True:
            try:
                beat = self.host.heartbeat(interval)
                await self.nc.publish(subject, beat.model_dump_json().encode())
            except Exception:  # NATS reconnecting: the next beat goes out when it is back
                log.warning("heartbeat not sent", exc_info=True)
            await asyncio.sleep(interval)

    async def _serve(self) -> None:
        while True:
            msg = await self._queue.get()
            command = subjects.last_token(msg.subject, -1)
            try:
                reply = await self._handle(command, msg.data)
            except CallerError as exc:
                reply = ControlReply(ok=False, error=str(exc))
            except Exception as exc:  # a bug in a command must not take the host down
                log.exception("control command failed", extra={"command": command})
                reply = ControlReply(ok=False, error=f"{type(exc).__name__}: {exc}")
            if msg.reply:
                await self.nc.publish(msg.reply, reply.model_dump_json().encode())

    async def _handle(self, command: str, data: bytes) -> ControlReply:
        host = self.host
        match command:
            case "start":
                start: StartAgents = parse(StartAgents, data)
                host.obey(start.term)
                host.start(start.agents, start.generations, start.addenda)
                log.info(
                    "agents started",
                    extra={"agents": list(start.agents)[:20], "n": len(start.agents)},
                )
                return ControlReply()
            case "stop":
                stop: StopAgents = parse(StopAgents, data)
                host.obey(stop.term)
                outcomes = await host.stop(stop.agents, stop.timeout_s)
                log.info("agents stopped", extra={"outcomes": dict(list(outcomes.items())[:20])})
                return ControlReply(stopped=outcomes)
            case "assign":
                assign: AssignShards = parse(AssignShards, data)
                host.obey(assign.term)
                await host.assign(assign.shards, assign.pinned)
                log.info(
                    "mailboxes assigned",
                    extra={"shards": list(assign.shards), "pinned": list(assign.pinned)},
                )
                return ControlReply()
            case "agents":
                query: AgentsQuery = parse(AgentsQuery, data)
                return ControlReply(agents=tuple(await self._agents(query)))
            case _:
                raise CallerError(
                    f"unknown control command {command!r}: start, stop, assign or agents"
                )

    async def _agents(self, query: AgentsQuery) -> list[dict[str, Any]]:
        """Each agent's status; with `steps`, what it holds and its latest journaled steps."""
        names = query.agents or tuple(self.host.agents)
        rows = []
        for name in names:
            agent = self.host.agent(name)
            row = {"host": self.host.id, **agent.status()}
            current, queued = _holding(agent)
            if query.steps and current is not None:
                journal = await self.host.ctx.journal.load(name, current.conversation_id)
                row["current"] = current.model_dump(mode="json")
                row["queued"] = list(queued)
                row["steps"] = [_step(e) for e in journal[-query.steps :]]
            rows.append(row)
        return rows


def _holding(agent: AnyAgent) -> tuple[Envelope | None, tuple[str, ...]]:
    """The task in hand and the ids queued behind it: from the queue of an agent in this
    host, from the latest report of an isolated one."""
    if isinstance(agent, ProcessAgent):
        return agent.current, agent.queued
    return holding(agent.queue)


def _step(entry: Envelope) -> dict[str, Any]:
    payload = entry.payload.model_dump(mode="json", exclude_none=True)
    text = payload.get("text") or payload.get("result") or payload.get("message") or ""
    return {
        "id": entry.id,
        "kind": entry.kind.value,
        "ts": entry.ts.isoformat(),
        "step": entry.step,
        "text": str(text)[:200],
    }
