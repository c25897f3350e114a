"""Mailbox consumers: one durable push consumer per shard feeds the agents of that shard,
and one per pinned agent (placement labels) feeds that agent alone.

The host that owns a shard receives its messages in stream order and hands each to its
agent's queue; the message stays unacknowledged until the agent is done with it, and the
server stops delivering when `max_ack_pending` messages are in hand. Push, not pull: pull
`fetch` waits to fill a batch, which adds up to its timeout of latency to a trickle.

A host that takes a consumer over (at start, or when the supervisor re-homes a shard) binds
it to its own deliver subject, so the previous owner, if still alive, gets nothing more.
A consumer whose previous owner died with messages in hand is rewound to its ack
floor, so they are redelivered at once instead of after ack_wait; messages already finished
are recognised from the journal and only acknowledged. A rewound consumer counts deliveries
from one again, so the deliveries of dead owners are counted in the BL_ATTEMPTS bucket: a
message that kills every host it reaches is dead-lettered as poison, not replayed forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Protocol

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from beamline import subjects
from beamline.deadletter import dead_letter_msg
from beamline.errors import CallerError, Reason
from beamline.service import crash_on_error
from services.agent import intake
from services.agent.runner import Delivery
from services.agent.settings import AgentHostSettings

log = logging.getLogger("beamline.agent.mailbox")


class Recipient(Protocol):
    """What a mailbox hands messages to: an agent, in a host or in its own process."""

    def deliver(self, delivery: Delivery) -> None: ...


@dataclass(frozen=True)
class Mailbox:
    """Which stored inbox messages one consumer feeds this host: a shard of every agent's
    mailbox, or the whole mailbox of one pinned agent (an agent with placement labels)."""

    name: str  # the durable consumer
    filter_subject: str
    deliver_subject: str  # per host, so a consumer taken over no longer feeds the old host

    @classmethod
    def shard(cls, host: str, k: int) -> Mailbox:
        return cls(
            subjects.mailbox_consumer(k),
            subjects.mailbox_shard(k),
            subjects.mailbox_deliver(host, k),
        )

    @classmethod
    def pinned(cls, host: str, agent: str) -> Mailbox:
        return cls(
            subjects.pinned_consumer(agent),
            subjects.mailbox_of(agent),
            subjects.pinned_deliver(host, agent),
        )


class MailboxConsumer:
    """Receives one mailbox's messages and hands each to its agent, unacknowledged."""

    def __init__(
        self,
        js: JetStreamContext,
        mailbox: Mailbox,
        agents: Callable[[str], Recipient | None],
        settings: AgentHostSettings,
        max_bytes: int,
        elsewhere: Container[str] = (),
    ) -> None:
        self.js, self.mailbox, self.agents = js, mailbox, agents
        self.settings, self.max_bytes = settings, max_bytes
        self.elsewhere = elsewhere  # pinned agents: their own consumer serves them
        self.name = mailbox.name
        self.in_flight: dict[int, Msg] = {}  # by stream sequence
        self._touched: dict[int, float] = {}  # stream sequence -> monotonic, received or kept
        self.received = 0
        self.dead_lettered = 0
        self._sub: Subscription | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._attempts: KeyValue | None = None
        self._replay_upto = 0  # stream seqs up to here were delivered to a dead owner
        self._config = ConsumerConfig(
            durable_name=self.name,
            filter_subject=mailbox.filter_subject,
            deliver_subject=mailbox.deliver_subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=settings.ack_wait_s,
            max_ack_pending=settings.max_in_flight,
            max_deliver=-1,
        )

    async def open(self) -> None:
        """Create the consumer, or take it over from its last owner: rewound to its ack
        floor, so what that owner held unfinished is redelivered here at once."""
        config = self._config
        self._attempts = await self.js.key_value(subjects.BUCKET_ATTEMPTS)
        try:
            info = await self.js.consumer_info(subjects.STREAM_MAILBOX, self.name)
        except NotFoundError:
            await self.js.add_consumer(subjects.STREAM_MAILBOX, config)
            return
        if info.num_ack_pending or info.config.deliver_subject != config.deliver_subject:
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            self._replay_upto = info.delivered.stream_seq if info.delivered else 0
            await self.js.delete_consumer(subjects.STREAM_MAILBOX, self.name)
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = (floor or 0) + 1
            await self.js.add_consumer(subjects.STREAM_MAILBOX, config)
            log.info(
                "shard rewound to its ack floor for immediate redelivery",
                extra={
                    "consumer": self.name,
                    "from_seq": config.opt_start_seq,
                    "unacked": info.num_ack_pending,
                },
            )

    async def start(self) -> None:
        self._sub = await self.js.subscribe_bind(
            subjects.STREAM_MAILBOX,
            self._config,
            self.name,
            cb=self._route,
            manual_ack=True,
            pending_msgs_limit=self.settings.max_in_flight * 2,
        )
        self._keeper = asyncio.create_task(self._keep_waiting(), name=f"keep:{self.name}")
        self._keeper.add_done_callback(crash_on_error)

    async def stop_taking(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _keep_waiting(self) -> None:
        """Every third of `ack_wait_s`, keep the messages held that long from redelivery
        (queued behind a busy agent, or held by a paused one): in every process that
        consumes a mailbox, an agent host's shards as an isolated agent's own."""
        period = self.settings.ack_wait_s / 3
        while True:
            await asyncio.sleep(period)
            await self.keep(period)

    async def _route(self, msg: Msg) -> None:
        self.received += 1
        agent_name = subjects.last_token(msg.subject, -1)
        if agent_name in self.elsewhere:
            await msg.ack()  # a pinned agent's message: its own consumer delivers it
            return
        agent = self.agents(agent_name)
        try:
            if agent is None:
                raise CallerError(
                    f"no agent named {agent_name!r} is declared; check the name or the config",
                    Reason.UNKNOWN_RECIPIENT,
                )
            task = intake.task_from_msg(msg, recipient=agent_name, max_bytes=self.max_bytes)
        except CallerError as exc:
            self.dead_lettered += 1
            inbox = f"bl.agent.{agent_name}.inbox"  # where it was published, before the shard
            await dead_letter_msg(self.js, msg, origin="agent", error=exc, subject=inbox)
            return
        delivery = Delivery(task, MailboxAck(msg, self))
        deliveries = await self._deliveries(msg)
        if deliveries > self.settings.max_deliveries:
            delivery.poison = f"delivered {deliveries} times without being finished"
        self.in_flight[msg.metadata.sequence.stream] = msg
        self._touched[msg.metadata.sequence.stream] = time.monotonic()
        # the incarnation may have changed during the awaits above (a start, after a
        # re-home): hand it to the current one, or the queue would wait for a kick
        (self.agents(agent_name) or agent).deliver(delivery)

    async def _deliveries(self, msg: Msg) -> int:
        """How often this message has been delivered, dead owners included. Only messages
        replayed by a rewind cost a bucket round trip; new ones are counted by JetStream."""
        seq = msg.metadata.sequence.stream
        count = msg.metadata.num_delivered
        if seq > self._replay_upto or self._attempts is None:
            return count
        key = f"mbox.{seq}"
        try:
            before = int((await self._attempts.get(key)).value or b"0")
        except KeyNotFoundError:
            before = 0
        await self._attempts.put(key, str(before + 1).encode())
        return count + before + 1

    def done(self, msg: Msg) -> None:
        self.in_flight.pop(msg.metadata.sequence.stream, None)
        self._touched.pop(msg.metadata.sequence.stream, None)

    async def keep(self, older_than_s: float) -> int:
        """Tell the server that messages held longer than `older_than_s` are still being
        worked on (AckProgress), so none is redelivered while it waits its turn in a long
        queue or behind a paused agent: a redelivery would count towards `max_deliveries`
        and end as a poison dead letter. Returns how many were kept."""
        now, kept = time.monotonic(), 0
        for seq, msg in list(self.in_flight.items()):
            if now - self._touched.get(seq, now) < older_than_s:
                continue
            try:
                await msg.in_progress()
            except Exception as exc:  # NATS reconnecting: the next round tries again
                log.warning("in-progress not sent", extra={"seq": seq, "error": repr(exc)})
                return kept
            self._touched[seq] = now
            kept += 1
        return kept


class MailboxAck:
    """Acknowledges the mailbox message and forgets it in the shard's in-flight table."""

    def __init__(self, msg: Msg, shard: MailboxConsumer) -> None:
        self.msg, self.shard = msg, shard

    async def ack(self) -> None:
        try:
            await self.msg.ack()
        finally:
            self.shard.done(self.msg)
