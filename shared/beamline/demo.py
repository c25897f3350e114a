"""`beamline demo`: the embedded mesh, a research team on fakellm, three tasks, one trace."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from beamline import bus, client, query, reads, subjects, traceview
from beamline.polling import wait_for
from beamline.runtime import Mesh, RuntimeOptions
from beamline.settings import MeshSettings

TASKS = (
    ("research", "What happens when a supervisor exceeds its restart intensity?"),
    ("analysis", "What does a call with 1000 input and 500 output tokens cost?"),
    ("writing", "Describe Beamline in one paragraph."),
)


async def run(options: RuntimeOptions, data_dir: Path) -> int:
    shutil.rmtree(data_dir, ignore_errors=True)  # a demo starts from nothing
    settings = MeshSettings(data_dir=data_dir)  # the team file: BEAMLINE_CONFIG or the example
    mesh = Mesh(settings, options)
    print(f"starting the embedded mesh under {data_dir} …")
    try:
        await mesh.start()
        nc = await bus.connect(mesh.nats_url, "beamline-demo")
        try:
            conversations = []
            for role, prompt in TASKS:
                conversations.append(await client.submit(nc, subjects.task(role), prompt))
                print(f"→ {role}: {prompt}")
            replies = await asyncio.gather(
                *(client.await_reply(nc, c, timeout=60) for c in conversations)
            )
            failed = 0
            for (role, _), reply in zip(TASKS, replies, strict=True):
                failed += reply.kind.value != "reply"
                print(f"← {role} ({reply.sender}): {client.reply_text(reply)}")
            first = conversations[0]

            async def recorded() -> list[dict[str, object]] | None:
                rows = (await query.query(nc, reads.TRACE_SQL, {"id": first})).dicts()
                return rows if any(r["kind"] == "reply" for r in rows) else None

            rows = await wait_for(
                recorded, timeout=30, interval=0.2, what="the trace in ClickHouse"
            )
            print("\nThe first task's trace, as recorded in ClickHouse:")
            print(traceview.render(rows))
            print(f"\nExplore it again with: beamline trace {first}")
        finally:
            await nc.close()
    finally:
        mesh.stop()
    return 1 if failed else 0
