"""Role tasks -> agent mailboxes.

`bl.task.<role>` is consumed by one durable consumer shared by every host. Each task goes to
one declared agent of that role, chosen by a hash of the conversation id so a conversation
keeps talking to the same agent, and is re-published into that agent's mailbox with the task
id as `Nats-Msg-Id`: a redelivered task de-duplicates instead of running twice.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Sequence

from beamline import bus, subjects
from beamline.config import AgentSpec
from beamline.deadletter import dead_letter
from beamline.errors import CallerError, Reason
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.client import JetStreamContext

from services.agent import intake

log = logging.getLogger("beamline.agent.dispatch")


def choose(agents: Sequence[AgentSpec], conversation_id: str) -> AgentSpec:
    return agents[zlib.crc32(conversation_id.encode()) % len(agents)]


class Dispatcher:
    def __init__(
        self, js: JetStreamContext, agents: Sequence[AgentSpec], max_bytes: int, batch: int
    ) -> None:
        self.js, self.max_bytes, self.batch = js, max_bytes, batch
        self.by_role: dict[str, list[AgentSpec]] = {}
        for spec in agents:
            self.by_role.setdefault(spec.role, []).append(spec)
        self.dispatched = 0
        self.dead_lettered = 0

    async def open(self) -> None:
        await self.js.add_consumer(
            subjects.STREAM_TASKS,
            ConsumerConfig(
                durable_name=subjects.CONSUMER_DISPATCH,
                filter_subject=subjects.TASKS_ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30,
                max_ack_pending=10_000,
            ),
        )

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self.js.pull_subscribe_bind(subjects.CONSUMER_DISPATCH, subjects.STREAM_TASKS)
        while not stop.is_set():
            try:
                msgs = await sub.fetch(self.batch, timeout=1.0)
            except (NatsTimeout, TimeoutError):
                continue
            except Exception as exc:
                log.warning("dispatch fetch failed; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(0.5)
                continue
            await asyncio.gather(*(self._dispatch(m) for m in msgs))
        await sub.unsubscribe()

    async def _dispatch(self, msg: Msg) -> None:
        meta = msg.metadata
        role = msg.subject.split(".", 2)[2]
        origin = f"{subjects.STREAM_TASKS}:{meta.sequence.stream}"
        try:
            candidates = self.by_role.get(role)
            if not candidates:
                raise CallerError(
                    f"no agent has role {role!r} (roles: {sorted(self.by_role)})",
                    Reason.UNKNOWN_ROLE,
                )
            task = intake.to_task(
                msg.data,
                msg.headers,
                recipient="?",
                origin=origin,
                received=meta.timestamp,
                max_bytes=self.max_bytes,
            )
        except CallerError as exc:
            self.dead_lettered += 1
            await dead_letter(
                self.js,
                origin="task",
                reason=exc.reason,
                detail=str(exc),
                subject=msg.subject,
                data=msg.data,
                key=origin,
                ts=meta.timestamp,
            )
            await msg.ack()
            return
        agent = choose(candidates, task.conversation_id)
        task = task.model_copy(update={"recipient": agent.name})
        await bus.publish(self.js, subjects.inbox(agent.name), task)
        await msg.ack()
        self.dispatched += 1
