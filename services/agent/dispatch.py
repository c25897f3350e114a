"""Role tasks -> agent mailboxes.

`bl.task.<role>` is consumed by one durable push consumer with a deliver group, shared
by every host. Each task goes to
one declared agent of that role, chosen by a hash of the conversation id so a conversation
keeps talking to the same agent, and is re-published into that agent's mailbox with the task
id as `Nats-Msg-Id`: a redelivered task de-duplicates instead of running twice.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.client import JetStreamContext

from beamline import bus, subjects
from beamline.config import AgentSpec
from beamline.deadletter import dead_letter_msg
from beamline.errors import CallerError, Reason
from services.agent import intake

log = logging.getLogger("beamline.agent.dispatch")


def choose(agents: Sequence[AgentSpec], conversation_id: str) -> AgentSpec:
    return agents[zlib.crc32(conversation_id.encode()) % len(agents)]


class Dispatcher:
    def __init__(self, js: JetStreamContext, agents: Sequence[AgentSpec], max_bytes: int) -> None:
        self.js, self.max_bytes = js, max_bytes
        self.by_role: dict[str, list[AgentSpec]] = {}
        for spec in agents:
            self.by_role.setdefault(spec.role, []).append(spec)
        self.dispatched = 0
        self.dead_lettered = 0
        self._sub: Subscription | None = None
        self._config = ConsumerConfig(
            durable_name=subjects.CONSUMER_DISPATCH,
            filter_subject=subjects.TASKS_ALL,
            deliver_subject=subjects.DELIVER_DISPATCH,
            deliver_group=subjects.CONSUMER_DISPATCH,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            max_ack_pending=10_000,
        )

    async def open(self) -> None:
        await self.js.add_consumer(subjects.STREAM_TASKS, self._config)

    async def start(self) -> None:
        # a deliver group: every host may bind, each task goes to one of them
        self._sub = await self.js.subscribe_bind(
            subjects.STREAM_TASKS,
            self._config,
            subjects.CONSUMER_DISPATCH,
            cb=self._dispatch,
            manual_ack=True,
        )

    async def stop_taking(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _dispatch(self, msg: Msg) -> None:
        role = msg.subject.split(".", 2)[2]
        try:
            candidates = self.by_role.get(role)
            if not candidates:
                raise CallerError(
                    f"no agent has role {role!r} (roles: {sorted(self.by_role)})",
                    Reason.UNKNOWN_ROLE,
                )
            task = intake.task_from_msg(msg, recipient=role, max_bytes=self.max_bytes)
        except CallerError as exc:
            self.dead_lettered += 1
            await dead_letter_msg(self.js, msg, origin="task", error=exc)
            return
        # the envelope goes on unchanged (same id, same content): only its subject says which
        # agent will handle it
        agent = choose(candidates, task.conversation_id)
        await bus.publish(self.js, subjects.inbox(agent.name), task)
        await msg.ack()
        self.dispatched += 1
