"""The agent host: many agents in one process, their mailboxes, and role dispatch."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from beamline import bus, config, nats_auth, streams
from beamline.nats_auth import Role
from beamline.service import answer_health
from beamline.settings import MeshSettings
from services.agent.control import Control
from services.agent.dispatch import Dispatcher
from services.agent.host import Host
from services.agent.runner import HostContext
from services.agent.settings import AgentHostSettings

log = logging.getLogger("beamline.agent")


async def main(stop: asyncio.Event) -> None:
    mesh, settings = MeshSettings(), AgentHostSettings()
    deployment = config.load(mesh.config)
    deployment.check_tools()
    static_shards = settings.owned_shards(mesh.mailbox_shards, bool(deployment.supervisors))

    nc = await bus.connect(mesh.nats_url, f"agent-host:{settings.host_id}")
    js = nc.jetstream()
    await streams.require_layout(js, nats_auth.USES[Role.AGENT], mesh.layout_wait_s)
    ctx = HostContext.open(nc, settings)
    circuits = ctx.circuits
    host = Host(ctx, deployment, settings, mesh.max_message_bytes, mesh.mailbox_shards)
    dispatcher = Dispatcher(js, deployment.agents, mesh.max_message_bytes)
    await dispatcher.open()
    if static_shards is not None:
        await host.assign(static_shards)
    control = Control(nc, host)

    def status() -> dict[str, Any]:
        mailboxes = host.mailboxes()
        return {
            "host": host.id,
            "labels": host.labels,
            "shards": sorted(host.shards),
            "pinned": sorted(host.pinned),
            "agents": [a.status() for a in list(host.agents.values())[:1000]],
            "dispatched": dispatcher.dispatched,
            "dead_lettered": dispatcher.dead_lettered + sum(m.dead_lettered for m in mailboxes),
            "in_flight": sum(len(m.in_flight) for m in mailboxes),
            "restart_ms": list(host.restart_ms)[-1000:],
            "breakers": {p: s.state.value for p, s in circuits.seen.items()},
        }

    health = await answer_health(nc, "agent", status)
    await control.start()
    await dispatcher.start()
    log.info(
        "agent host ready",
        extra={
            "host": host.id,
            "agents": len(host.agents),
            "shards": "assigned by the supervisor" if static_shards is None else len(static_shards),
        },
    )
    await stop.wait()

    # Graceful stop: stop taking work, finish what each agent has in hand, then close.
    host.taking = False
    await dispatcher.stop_taking()
    for mailbox in host.mailboxes():
        await mailbox.stop_taking()
    await asyncio.gather(*(a.stop(timeout=10) for a in host.agents.values()))
    await ctx.close()
    await control.close()
    await health.unsubscribe()
    await nc.drain()
