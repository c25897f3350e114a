"""The supervisor service: leader election, then the supervision tree at work.

Every instance keeps its view of the hosts warm from their heartbeats; only the leader
decides, commands hosts and answers operators. A standby that sees the lease lapse takes
over and continues from the recorded tree state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats.aio.msg import Msg
from pydantic import ValidationError

from beamline import bus, config, nats_auth, streams, subjects
from beamline.budget import SubtreeExhausted
from beamline.control import ChildExit, ControlReply, HostHeartbeat, parse
from beamline.errors import CallerError
from beamline.events import EventSink
from beamline.guard import GuardCommand, GuardReply
from beamline.nats_auth import Role
from beamline.service import answer_health, crash_on_error
from beamline.settings import MeshSettings
from services.supervisor.admin import Admin
from services.supervisor.commands import HostCommands
from services.supervisor.lease import Lease
from services.supervisor.settings import SupervisorSettings
from services.supervisor.supervision import (
    SOURCE,
    Exhausted,
    ExitSeen,
    Guarded,
    Retry,
    Supervision,
)

log = logging.getLogger("beamline.supervisor")

HOST_CHECK_S = 0.05
TICK_S = 1.0
GUARD_TIMEOUT_S = 60.0  # a guard command waits its turn in the inbox, then is carried out


async def main(stop: asyncio.Event) -> None:
    mesh, settings = MeshSettings(), SupervisorSettings()
    deployment = config.load(mesh.config)
    nc = await bus.connect(mesh.nats_url, f"supervisor:{settings.instance_id}")
    js = nc.jetstream()
    await streams.require_layout(js, nats_auth.USES[Role.SUPERVISOR], mesh.layout_wait_s)
    kv = await js.key_value(subjects.BUCKET_SUPERVISOR)
    events = EventSink(js, SOURCE)
    events.start()
    commands = HostCommands(nc, settings.command_timeout_s)
    sv = Supervision(deployment, mesh.mailbox_shards, settings, commands, events, kv)
    lease = Lease(kv, settings.instance_id, settings.lease_s)
    admin = Admin(sv, commands, deployment)

    async def on_heartbeat(msg: Msg) -> None:
        try:
            sv.on_heartbeat(parse(HostHeartbeat, msg.data))
        except CallerError as exc:
            log.warning("bad heartbeat ignored", extra={"subject": msg.subject, "error": str(exc)})

    async def on_exit(msg: Msg) -> None:
        if not sv.leading:
            return  # the host retries until the leader acknowledges
        try:
            report: ChildExit = parse(ChildExit, msg.data)
        except CallerError as exc:
            await msg.respond(ControlReply(ok=False, error=str(exc)).model_dump_json().encode())
            return
        sv.inbox.put_nowait(ExitSeen(report.agent, report.generation, report.exit, report.host))
        await msg.respond(ControlReply().model_dump_json().encode())

    async def on_exhausted(msg: Msg) -> None:
        if not sv.leading:
            return  # the budget service re-sends until the leader acknowledges
        try:
            report = SubtreeExhausted.model_validate_json(msg.data)
        except ValidationError as exc:
            error = f"not a valid SubtreeExhausted: {exc.errors()[0]['msg']}"
            await msg.respond(ControlReply(ok=False, error=error).model_dump_json().encode())
            return
        sv.inbox.put_nowait(Exhausted(report))
        await msg.respond(ControlReply().model_dump_json().encode())

    async def on_guard(msg: Msg) -> None:
        if not sv.leading:
            return  # the loop guard re-sends until the leader answers
        try:
            command: GuardCommand = parse(GuardCommand, msg.data)
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            sv.inbox.put_nowait(Guarded(command, done))
            reply = GuardReply(state=await asyncio.wait_for(done, GUARD_TIMEOUT_S))
        except CallerError as exc:
            reply = GuardReply(ok=False, error=str(exc), reason=exc.reason.value)
        except Exception as exc:  # not carried out (in time): the loop guard re-sends
            log.exception("guard command failed", extra={"subject": msg.subject})
            reply = GuardReply(ok=False, error=f"{type(exc).__name__}: {exc}")
        await msg.respond(reply.model_dump_json(exclude_none=True).encode())

    def status() -> dict[str, Any]:
        return {
            "instance": settings.instance_id,
            "role": "leader" if sv.leading else "standby",
            "leader": lease.leader,
            "term": lease.term if sv.leading else None,
            "hosts": sv.hosts.live(),
            "supervisors_up": sorted(sv.states),
            "events_dropped": events.dropped,
        }

    subs = [
        await nc.subscribe(subjects.HEARTBEATS_ALL, cb=on_heartbeat),
        await nc.subscribe(subjects.CHILD_EXIT, cb=on_exit),
        await nc.subscribe(subjects.ADMIN_ALL, cb=admin.on_request),
        await nc.subscribe(subjects.SUBTREE_EXHAUSTED, cb=on_exhausted),
        await nc.subscribe(subjects.GUARD, cb=on_guard),
        await answer_health(nc, "supervisor", status),
    ]
    watch = asyncio.create_task(_watch_hosts(sv), name="host-watch")
    watch.add_done_callback(crash_on_error)
    log.info("supervisor ready", extra={"instance": settings.instance_id, "root": sv.root})

    while await lease.acquire(stop):
        await _lead(sv, lease, stop)
        if stop.is_set():
            await lease.release()

    watch.cancel()
    for sub in subs:
        await sub.unsubscribe()
    await events.close(timeout=5)
    await nc.drain()


async def _lead(sv: Supervision, lease: Lease, stop: asyncio.Event) -> None:
    """Lead until `stop` or until the lease is lost; then stand by again."""
    renewing = asyncio.create_task(_renew(lease), name="lease")
    loops = [
        asyncio.create_task(sv.run(), name="supervise"),
        asyncio.create_task(sv.save_loop(), name="record"),
        asyncio.create_task(_tick(sv), name="tick"),
    ]
    for loop in loops:
        loop.add_done_callback(crash_on_error)
    sv.begin(lease.term)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([renewing, stopping], return_when=asyncio.FIRST_COMPLETED)
    if renewing.done():
        log.error("lease lost: another instance leads now; standing by", extra={"term": lease.term})
    sv.step_down()
    for task in [renewing, stopping, *loops]:
        task.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.gather(renewing, stopping, *loops, return_exceptions=True)


async def _renew(lease: Lease) -> None:
    """Returns when the lease is lost: taken by another, or not renewed for a whole lease."""
    loop = asyncio.get_running_loop()
    renewed_at = loop.time()
    while loop.time() - renewed_at < lease.lease_s:
        await asyncio.sleep(lease.lease_s / 4)
        try:
            if not await asyncio.wait_for(lease.renew(), lease.lease_s / 4):
                return
            renewed_at = loop.time()
        except Exception:
            log.warning("lease not renewed", exc_info=True)


async def _watch_hosts(sv: Supervision) -> None:
    while True:
        await asyncio.sleep(HOST_CHECK_S)
        sv.check_hosts()


async def _tick(sv: Supervision) -> None:
    """Now and then, retry starts that found no host or no answer (through the inbox)."""
    while True:
        await asyncio.sleep(TICK_S)
        if sv.pending and sv.inbox.empty():
            sv.inbox.put_nowait(Retry())
