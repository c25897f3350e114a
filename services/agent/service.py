"""The agent host: many agents in one process, their mailboxes, and role dispatch."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from beamline import bus, config, streams
from beamline.service import answer_health
from beamline.settings import MeshSettings
from services.agent.dispatch import Dispatcher
from services.agent.journal import Journal
from services.agent.mailbox import Shard
from services.agent.runner import Agent, HostContext
from services.agent.settings import AgentHostSettings

log = logging.getLogger("beamline.agent")


async def main(stop: asyncio.Event) -> None:
    mesh, settings = MeshSettings(), AgentHostSettings()
    deployment = config.load(mesh.config)
    deployment.check_tools()
    shard_ids = settings.owned_shards(mesh.mailbox_shards)

    nc = await bus.connect(mesh.nats_url, f"agent-host:{settings.host_id}")
    js = nc.jetstream()
    await streams.ensure_streams(js, mesh.mailbox_shards)
    ctx = HostContext(nc=nc, js=js, journal=Journal(js), settings=settings)
    agents = {spec.name: Agent(spec, ctx) for spec in deployment.agents}

    dispatcher = Dispatcher(js, deployment.agents, mesh.max_message_bytes)
    await dispatcher.open()
    shards = [Shard(js, k, agents.get, settings, mesh.max_message_bytes) for k in shard_ids]
    for shard in shards:
        await shard.open()

    def status() -> dict[str, Any]:
        return {
            "host": settings.host_id,
            "shards": shard_ids,
            "agents": [a.status() for a in agents.values()],
            "dispatched": dispatcher.dispatched,
            "dead_lettered": dispatcher.dead_lettered + sum(s.dead_lettered for s in shards),
            "in_flight": sum(len(s.in_flight) for s in shards),
        }

    health = await answer_health(nc, "agent", status)
    for shard in shards:
        await shard.start()
    await dispatcher.start()
    log.info(
        "agent host ready",
        extra={"host": settings.host_id, "agents": len(agents), "shards": len(shard_ids)},
    )
    await stop.wait()

    # Graceful stop: stop taking work, finish what each agent has in hand, then close.
    await dispatcher.stop_taking()
    for shard in shards:
        await shard.stop_taking()
    await asyncio.gather(*(a.stop(timeout=10) for a in agents.values()))
    await health.unsubscribe()
    await nc.drain()
