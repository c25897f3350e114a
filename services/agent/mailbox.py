"""Mailbox shards: one durable pull consumer per shard feeds the agents of that shard.

The host that owns a shard reads it in stream order and hands each message to its agent's
queue; the message stays unacknowledged until the agent is done with it. On start, a shard
whose previous owner died with messages in hand is rewound to its ack floor, so they are
redelivered at once instead of after ack_wait; messages already finished are recognised
from the journal and only acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from beamline import subjects
from beamline.deadletter import dead_letter
from beamline.errors import CallerError, Reason
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from services.agent import intake
from services.agent.runner import Agent, Delivery
from services.agent.settings import AgentHostSettings

log = logging.getLogger("beamline.agent.mailbox")


class Shard:
    def __init__(
        self,
        js: JetStreamContext,
        shard: int,
        agents: Callable[[str], Agent | None],
        settings: AgentHostSettings,
        max_bytes: int,
    ) -> None:
        self.js, self.shard, self.agents = js, shard, agents
        self.settings, self.max_bytes = settings, max_bytes
        self.name = subjects.mailbox_consumer(shard)
        self.in_flight: dict[int, Msg] = {}  # by stream sequence
        self.received = 0
        self.dead_lettered = 0
        self._room = asyncio.Event()
        self._room.set()

    async def open(self) -> None:
        config = ConsumerConfig(
            durable_name=self.name,
            filter_subject=subjects.mailbox_shard(self.shard),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait_s,
            max_ack_pending=self.settings.max_in_flight,
            max_deliver=-1,
        )
        try:
            info = await self.js.consumer_info(subjects.STREAM_MAILBOX, self.name)
        except NotFoundError:
            await self.js.add_consumer(subjects.STREAM_MAILBOX, config)
            return
        if info.num_ack_pending:
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            await self.js.delete_consumer(subjects.STREAM_MAILBOX, self.name)
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = (floor or 0) + 1
            await self.js.add_consumer(subjects.STREAM_MAILBOX, config)
            log.info(
                "shard rewound to its ack floor for immediate redelivery",
                extra={
                    "shard": self.shard,
                    "from_seq": config.opt_start_seq,
                    "unacked": info.num_ack_pending,
                },
            )

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self.js.pull_subscribe_bind(self.name, subjects.STREAM_MAILBOX)
        while not stop.is_set():
            room = self.settings.max_in_flight - len(self.in_flight)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                msgs = await sub.fetch(min(room, self.settings.fetch_batch), timeout=1.0)
            except (NatsTimeout, TimeoutError):
                continue
            except Exception as exc:  # NATS restarting: pause, then fetch again
                log.warning(
                    "shard fetch failed; retrying", extra={"shard": self.shard, "error": repr(exc)}
                )
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                await self._route(msg)
        await sub.unsubscribe()

    async def _route(self, msg: Msg) -> None:
        self.received += 1
        meta = msg.metadata
        agent_name = subjects.last_token(msg.subject, -1)
        origin = f"{subjects.STREAM_MAILBOX}:{meta.sequence.stream}"
        agent = self.agents(agent_name)
        try:
            if agent is None:
                raise CallerError(
                    f"no agent named {agent_name!r} is declared; check the name or the config",
                    Reason.UNKNOWN_RECIPIENT,
                )
            if meta.num_delivered > self.settings.max_deliveries:
                raise CallerError(
                    f"delivered {meta.num_delivered} times without being finished",
                    Reason.POISON,
                )
            task = intake.to_task(
                msg.data,
                msg.headers,
                recipient=agent_name,
                origin=origin,
                received=meta.timestamp,
                max_bytes=self.max_bytes,
            )
        except CallerError as exc:
            self.dead_lettered += 1
            await dead_letter(
                self.js,
                origin="agent",
                reason=exc.reason,
                detail=str(exc),
                subject=f"bl.agent.{agent_name}.inbox",
                data=msg.data,
                key=origin,
                ts=meta.timestamp,
            )
            await msg.ack()
            return
        self.in_flight[meta.sequence.stream] = msg
        agent.deliver(Delivery(task, _Acker(msg, self)))

    def done(self, msg: Msg) -> None:
        self.in_flight.pop(msg.metadata.sequence.stream, None)
        self._room.set()


class _Acker:
    """Looks like a Msg to the agent; acknowledging also frees room in the shard."""

    def __init__(self, msg: Msg, shard: Shard) -> None:
        self._msg, self._shard = msg, shard

    async def ack(self) -> None:
        try:
            await self._msg.ack()
        finally:
            self._shard.done(self._msg)
