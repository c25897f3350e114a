"""`python -m services.gateway`: the LLM gateway (Membrane) as a process."""

from __future__ import annotations

import asyncio
import logging

from beamline import bus, config, nats_auth, streams, subjects
from beamline.nats_auth import Role
from beamline.service import run
from beamline.settings import MeshSettings
from services.gateway.service import SERVICE, Gateway
from services.gateway.settings import GatewaySettings

log = logging.getLogger("services.gateway")


async def main(stop: asyncio.Event) -> None:
    mesh = MeshSettings()
    settings = GatewaySettings()
    deployment = config.load(mesh.config)  # a bad file stops us here, before connecting
    nc = await bus.connect(mesh.nats_url, SERVICE)
    try:
        js = nc.jetstream()
        await streams.require_layout(js, nats_auth.USES[Role.GATEWAY], mesh.layout_wait_s)
        kv = await js.key_value(subjects.BUCKET_LLM_RESULTS)
        breakers = await js.key_value(subjects.BUCKET_BREAKERS)
        gateway = Gateway(settings, mesh, deployment, nc, kv, breakers)
        await gateway.start()
        await stop.wait()
        log.info("stopping: no new requests, finishing in-flight ones")
        await gateway.stop()
    finally:
        try:
            await asyncio.wait_for(nc.drain(), timeout=5)
        except Exception:  # NATS unreachable at shutdown: nothing left to flush
            await nc.close()


if __name__ == "__main__":
    run(SERVICE, main, MeshSettings().log_level)
