"""Commands to agent hosts, as requests on `bl.ctl.<host>.<command>` carrying the leader's
term. A host that does not answer is reported as `HostUnreachable`; its heartbeats (or
their absence) decide whether it is lost."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nats.aio.client import Client as NATS
from pydantic import BaseModel

from beamline import subjects
from beamline.control import (
    AgentsQuery,
    AssignShards,
    ControlReply,
    StartAgents,
    StopAgents,
    StopOutcome,
)
from beamline.guard import Addendum

# "infinity" is a promise to wait; still, a command must end: an hour stands for it
INFINITY_S = 3600.0
START_CHUNK = 2000


class HostUnreachable(Exception):
    pass


class CommandRefused(Exception):
    pass


class HostCommands:
    def __init__(self, nc: NATS, timeout_s: float) -> None:
        self.nc, self.timeout_s = nc, timeout_s
        self.term = 0

    async def start(
        self,
        host: str,
        agents: Sequence[str],
        generations: Sequence[int],
        addenda: Mapping[str, Addendum] | None = None,
    ) -> None:
        """In order, in chunks that stay far below a control message's size limit."""
        addenda = addenda or {}
        for i in range(0, len(agents), START_CHUNK):
            chunk = tuple(agents[i : i + START_CHUNK])
            command = StartAgents(
                term=self.term,
                agents=chunk,
                generations=tuple(generations[i : i + START_CHUNK]),
                addenda={a: addenda[a] for a in chunk if a in addenda},
            )
            await self._request(host, "start", command)

    async def stop(
        self, host: str, agents: Sequence[str], timeout_s: float | None
    ) -> dict[str, StopOutcome]:
        wait = (timeout_s or 0.0) + self.timeout_s
        command = StopAgents(term=self.term, agents=tuple(agents), timeout_s=timeout_s)
        return (await self._request(host, "stop", command, wait)).stopped

    async def assign(self, host: str, shards: Sequence[int], pinned: Sequence[str]) -> None:
        await self._request(
            host, "assign", AssignShards(term=self.term, shards=tuple(shards), pinned=tuple(pinned))
        )

    async def agents(
        self, host: str, agents: Sequence[str] = (), steps: int = 0
    ) -> list[dict[str, Any]]:
        query = AgentsQuery(term=self.term, agents=tuple(agents), steps=steps)
        return list((await self._request(host, "agents", query)).agents)

    async def _request(
        self, host: str, command: str, body: BaseModel, timeout: float | None = None
    ) -> ControlReply:
        try:
            msg = await self.nc.request(
                subjects.control(host, command),
                body.model_dump_json().encode(),
                timeout=timeout or self.timeout_s,
            )
        except Exception as exc:  # no responders, timeout, NATS reconnecting
            raise HostUnreachable(f"host {host} did not answer {command}: {exc!r}") from exc
        reply = ControlReply.model_validate_json(msg.data)
        if not reply.ok:
            raise CommandRefused(f"host {host} refused {command}: {reply.error}")
        return reply
