"""`beamline demo`: the embedded mesh, the supervised research team on fakellm (three
hosts), three tasks and one trace; then an agent killed mid-task and a whole host killed,
each conversation resumed (beamline.demo_supervision); then each guard acting: a provider
failing over, a subtree stopped for its budget, a loop corrected then escalated, a long
conversation summarised (beamline.demo_guards)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from beamline import (
    bus,
    client,
    config,
    demo_guards,
    demo_supervision,
    query,
    subjects,
    traceview,
)
from beamline.polling import wait_for
from beamline.runtime import Mesh, RuntimeOptions
from beamline.settings import MeshSettings

TEAM = Path("infra/examples/supervised-team.yaml")
CONFIG_ENV = "BEAMLINE_CONFIG"
TASKS = (
    ("research", "What happens when a supervisor exceeds its restart intensity?"),
    ("analysis", "What does a call with 1000 input and 500 output tokens cost?"),
    ("writing", "Describe Beamline in one paragraph."),
)


async def run(options: RuntimeOptions, data_dir: Path) -> int:
    shutil.rmtree(data_dir, ignore_errors=True)  # a demo starts from nothing
    # the team file: BEAMLINE_CONFIG, else the supervised example
    settings = MeshSettings(data_dir=data_dir, config=Path(os.environ.get(CONFIG_ENV, TEAM)))
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
                rows = (await query.trace(nc, first)).dicts()
                return rows if any(r["kind"] == "reply" for r in rows) else None

            rows = await wait_for(
                recorded, timeout=30, interval=0.2, what="the trace in ClickHouse"
            )
            print("\nThe first task's trace, as recorded in ClickHouse:")
            print(traceview.render(rows))
            print(f"\nExplore it again with: beamline trace {first}")
            if config.load(settings.config, mesh.env()).supervisors:
                failed += await demo_supervision.run(mesh, nc)
                failed += await demo_guards.run(nc)
        finally:
            await nc.close()
    finally:
        mesh.stop()
    return 1 if failed else 0
