"""Submitting tasks and awaiting replies from Python: what the CLI and the demo use, and
what a user's own code can use. Only NATS is needed; a plain client works the same way."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from beamline import bus, subjects
from beamline.config import Deployment
from beamline.envelope import Envelope, ErrorPayload, Kind, ReplyPayload, TaskPayload
from beamline.errors import CallerError, Reason
from beamline.ids import uuid7


def target_subject(deployment: Deployment, target: str) -> str:
    """An agent name means its inbox; a role means `bl.task.<role>`."""
    if deployment.agent(target):
        return subjects.inbox(target)
    if any(a.role == target for a in deployment.agents):
        return subjects.task(target)
    raise CallerError(
        f"{target!r} is neither an agent nor a role; agents: "
        f"{[a.name for a in deployment.agents]}, roles: {sorted({a.role for a in deployment.agents})}",
        Reason.UNKNOWN_RECIPIENT,
    )


async def submit(nc: NATS, subject: str, prompt: str, conversation_id: str | None = None) -> str:
    """Publish a task envelope (persisted by JetStream) to `bl.task.<role>` or
    `bl.agent.<agent>.inbox`; return its conversation id."""
    task_id = uuid7()
    env = Envelope(
        id=task_id,
        kind=Kind.TASK,
        sender="cli",
        recipient=subject.split(".")[2],  # the role or agent addressed
        conversation_id=conversation_id or task_id,
        payload=TaskPayload(prompt=prompt),
    )
    await bus.publish(nc.jetstream(), subject, env)
    return env.conversation_id


async def await_reply(
    nc: NATS, conversation_id: str, timeout: float = 120.0, after: int = 0
) -> Envelope:
    """The next reply or error of a conversation, read from the replies stream, so a reply
    sent before we started listening is not missed. `after` skips that many replies."""
    js = nc.jetstream()
    sub = await js.subscribe(
        subjects.reply(conversation_id),
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    try:
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                msg = await sub.next_msg(timeout=None)
                seen += 1
                if seen > after:
                    return bus.decode(msg.data, 4 * 1024 * 1024)
    except TimeoutError:
        raise TimeoutError(
            f"no reply on {subjects.reply(conversation_id)} within {timeout}s; is an agent host "
            "running (`beamline up`)? `beamline trace` shows how far the task got"
        ) from None
    finally:
        await sub.unsubscribe()


def reply_text(reply: Envelope) -> str:
    if isinstance(reply.payload, ReplyPayload):
        return reply.payload.text
    if isinstance(reply.payload, ErrorPayload):
        return f"error [{reply.payload.reason}]: {reply.payload.message}"
    return reply.model_dump_json()
