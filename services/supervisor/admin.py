"""Operator commands on `bl.admin.<command>`, answered by the leader: `ps`, `tree`,
`inspect`, and `kill` / `restart`, which are recorded as events and carried out in turn
with the supervisor's own decisions. A target that does not exist gets a clear error."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from nats.aio.msg import Msg

from beamline.config import Deployment
from beamline.control import AdminCommand, AdminReply, AdminRequest, parse
from beamline.errors import CallerError, Reason
from beamline.tree import member_name
from services.supervisor.commands import HostCommands, HostUnreachable
from services.supervisor.supervision import Operate, Supervision

log = logging.getLogger("beamline.supervisor.admin")

INSPECT_STEPS = 10
BULK_REPLY_NAMES = 1000
OPERATE_TIMEOUT_S = 120.0


class Admin:
    def __init__(
        self, supervision: Supervision, commands: HostCommands, deployment: Deployment
    ) -> None:
        self.sv, self.commands = supervision, commands
        templates = set(supervision.pools.values())
        self.agents = [a.name for a in deployment.agents if a.name not in templates]
        self.unsupervised = [a for a in self.agents if a not in supervision.parent]

    def ordered(self) -> list[str]:
        """Supervised agents in start order (pool members included), then the others."""
        return [*self.sv.order(), *self.unsupervised]

    async def on_request(self, msg: Msg) -> None:
        if not self.sv.leading:
            return  # a standby stays silent: the leader answers
        command = msg.subject.rsplit(".", 1)[-1]
        try:
            request: AdminRequest = parse(AdminRequest, msg.data)
            reply = AdminReply(result=await self._run(command, request))
        except CallerError as exc:
            reply = AdminReply(ok=False, error=str(exc), reason=exc.reason.value)
        except Exception as exc:
            log.exception("operator command failed", extra={"command": command})
            reply = AdminReply(ok=False, error=f"{type(exc).__name__}: {exc}")
        await msg.respond(reply.model_dump_json().encode())

    async def _run(self, command: str, request: AdminRequest) -> Any:
        try:
            which = AdminCommand(command)
        except ValueError:
            raise CallerError(
                f"unknown command {command!r}: {', '.join(c.value for c in AdminCommand)}",
                Reason.INVALID_SCHEMA,
            ) from None
        if which is AdminCommand.PS:
            return await self.ps()
        if which is AdminCommand.TREE:
            return self.sv.tree()
        if which is AdminCommand.START_CHILD:
            return await self._start_child(request)
        target = self._target(request.target)
        if (
            which is AdminCommand.TERMINATE_CHILD
            and self.sv.parent.get(target) not in self.sv.pools
        ):
            raise CallerError(
                f"{target!r} is not a member of a simple_one_for_one pool; "
                f"terminate_child removes pool members (kill or restart the others)",
                Reason.INVALID_SCHEMA,
            )
        if which is AdminCommand.INSPECT:
            return await self.inspect(target)
        if which is AdminCommand.KILL and target not in self.sv.parent:
            raise CallerError(
                f"{target!r} is not a supervised agent: no supervisor would restart it",
                Reason.UNKNOWN_RECIPIENT,
            )
        if which is AdminCommand.KILL and target in self.sv.specs:
            raise CallerError(
                f"{target!r} is a supervisor; kill agents, restart supervisors",
                Reason.INVALID_SCHEMA,
            )
        if (
            which is AdminCommand.RESTART
            and target not in self.sv.parent
            and target != self.sv.root
        ):
            raise CallerError(
                f"{target!r} is not supervised: nothing to restart", Reason.UNKNOWN_RECIPIENT
            )
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sv.inbox.put_nowait(Operate(which.value, target, request.requested_by, done))
        await asyncio.wait_for(done, OPERATE_TIMEOUT_S)
        if which is AdminCommand.TERMINATE_CHILD:
            return {"agent": target, "terminated": True}
        if target in self.sv.specs:
            return self.sv.tree()
        return self.sv.child_view(target)

    async def _start_child(self, request: AdminRequest) -> dict[str, Any]:
        pool = request.target or ""
        template = self.sv.pools.get(pool)
        if template is None:
            raise CallerError(
                f"{pool!r} is not a simple_one_for_one supervisor (pools: {sorted(self.sv.pools)})",
                Reason.UNKNOWN_RECIPIENT,
            )
        if bool(request.suffixes) == bool(request.count):
            raise CallerError("start_child takes suffixes or a count", Reason.INVALID_SCHEMA)
        try:
            names = tuple(member_name(template, s) for s in request.suffixes)
        except ValueError as exc:
            raise CallerError(str(exc), Reason.INVALID_SCHEMA) from None
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sv.inbox.put_nowait(
            Operate("start_child", pool, request.requested_by, done, names, request.count)
        )
        started: list[str] = await asyncio.wait_for(done, OPERATE_TIMEOUT_S)
        return {"supervisor": pool, "started": started[:BULK_REPLY_NAMES], "n": len(started)}

    def _target(self, target: str | None) -> str:
        if not target:
            raise CallerError("this command needs a target agent", Reason.INVALID_SCHEMA)
        if target in self.sv.parent:  # pool members are not declared
            return target
        if target not in self.agents and target not in self.sv.specs:
            raise CallerError(
                f"no agent or supervisor named {target!r} (agents: {self.agents[:20]})",
                Reason.UNKNOWN_RECIPIENT,
            )
        return target

    async def ps(self) -> list[dict[str, Any]]:
        by_host: dict[str, list[str]] = {}
        ordered = self.ordered()
        for agent in ordered:
            host = self.sv.host_of(agent)
            if host is not None and host in self.sv.hosts.hosts:
                by_host.setdefault(host, []).append(agent)
        live = await self._ask_hosts(by_host)
        return [self._row(agent, live.get(agent)) for agent in ordered]

    async def inspect(self, target: str) -> dict[str, Any]:
        if target in self.sv.specs:
            return self.sv.tree()
        host = self.sv.host_of(target)
        detail: dict[str, Any] | None = None
        if host is not None and host in self.sv.hosts.hosts:
            try:
                rows = await self.commands.agents(host, [target], steps=INSPECT_STEPS)
                detail = rows[0] if rows else None
            except HostUnreachable as exc:
                detail = {"error": str(exc)}
        return self._row(target, detail)

    async def _ask_hosts(self, by_host: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
        async def one(host: str, names: list[str]) -> list[dict[str, Any]]:
            try:
                return await self.commands.agents(host, names)
            except HostUnreachable:
                return []

        answers = await asyncio.gather(*(one(h, n) for h, n in by_host.items()))
        return {row["agent"]: row for rows in answers for row in rows}

    def _row(self, agent: str, live: dict[str, Any] | None) -> dict[str, Any]:
        view = (
            self.sv.child_view(agent)
            if agent in self.sv.parent
            else {"supervisor": None, "host": self.sv.host_of(agent)}
        )
        row: dict[str, Any] = {"agent": agent, **(live or {}), **view}
        if view.get("supervised") in ("stopped", "suspended", "dead", "removed", "restarting"):
            row["state"] = view["supervised"]
        row.setdefault("state", "unplaced" if view.get("host") is None else "unknown")
        seen = self.sv.hosts.hosts.get(row.get("host") or "")
        row["heartbeat_age_s"] = round(time.monotonic() - seen.seen_at, 3) if seen else None
        return row
