"""Publish a task with nothing but nats-py and wait for its reply (the README's example)."""

import asyncio
import json
import os
import uuid

import nats


async def main() -> None:
    nc = await nats.connect(os.environ.get("BEAMLINE_NATS_URL", "nats://127.0.0.1:4222"))
    conversation = f"readme-{uuid.uuid4().hex[:8]}"
    replies = await nc.subscribe(f"bl.reply.{conversation}")  # listen first, then ask
    task = {"prompt": "What does a supervisor do?", "conversation_id": conversation}
    await nc.publish("bl.task.research", json.dumps(task).encode())
    reply = json.loads((await replies.next_msg(timeout=60)).data)
    print(reply["payload"].get("text") or reply["payload"])
    await nc.close()


asyncio.run(main())
