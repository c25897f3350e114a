"""Pull requests for one stream's durable `recorder` consumer, answered into one inbox.

Raw pull requests into a core-NATS inbox: the messages arrive in a callback, as fast as a
push consumer, and the recorder asks only for what it can hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from beamline import subjects
from services.recorder.settings import RecorderSettings

log = logging.getLogger("beamline.recorder")

AckMeta = tuple[str, int, int, int]  # stream, num_delivered, stream_seq, timestamp ns
AcceptFn = Callable[[str, str, bytes, dict[str, str] | None, AckMeta, str], None]


def parse_ack_reply(reply: str) -> AckMeta | None:
    """(stream, num_delivered, stream_seq, timestamp ns) from a JetStream ack subject.

    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>` or the
    domain-qualified v2 form `$JS.ACK.<domain>.<account>.<stream>...` (11+ tokens)."""
    t = reply.split(".")
    if len(t) < 9 or t[0] != "$JS" or t[1] != "ACK":
        return None
    o = 2 if len(t) == 9 else 4
    try:
        return t[o], int(t[o + 2]), int(t[o + 3]), int(t[o + 5])
    except (IndexError, ValueError):
        return None


class Puller:
    """Credit = messages asked for and not yet received. Ask for `fetch_batch - credit` when
    credit falls to half; forget credit when the last request expired or the connection was
    re-established (the server forgot the requests). Over-asking is harmless:
    max_ack_pending bounds what the server delivers.

    `accept` takes each delivery; `paused` says to ask for nothing more (stopping, or the
    next batch is full); `consumer_deleted` is told when the server says the consumer is
    gone, so that it is declared again."""

    def __init__(
        self,
        nc: NATS,
        cfg: RecorderSettings,
        stream: str,
        accept: AcceptFn,
        paused: Callable[[], bool],
        consumer_deleted: Callable[[str], None],
    ) -> None:
        self.nc = nc
        self.cfg = cfg
        self.stream = stream
        self.accept = accept
        self.paused = paused
        self.consumer_deleted = consumer_deleted
        self.api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{subjects.CONSUMER_RECORDER}"
        self.inbox = ""
        self.sub: Subscription | None = None
        self.credit = 0
        self.deadline = 0.0
        self.reconnects = 0
        self.low_water = max(1, cfg.fetch_batch // 2)

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(
            self.inbox, cb=self.on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )

    async def on_msg(self, msg: Msg) -> None:
        """Deliveries (they have a reply subject to ack) and status messages."""
        if msg.reply:
            await self.deliver(msg.subject, msg.reply, msg.data, msg.headers)
        else:
            self.on_status(msg)

    async def deliver(
        self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None
    ) -> None:
        meta = parse_ack_reply(reply)
        if meta is None:
            log.warning(
                "a message with an unexpected reply subject cannot be acked; skipped",
                extra={"stream": self.stream, "subject": subject, "reply": reply},
            )
            return
        self.credit -= 1
        self.accept(subject, reply, data, headers, meta, self.stream)
        if self.credit <= self.low_water:
            await self.pump()

    def on_status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status in ("404", "408", "409"):
            pending = headers.get("Nats-Pending-Messages")
            if pending and pending.isdigit():
                self.credit = max(0, self.credit - int(pending))
            else:
                self.credit = 0
            if status == "409":
                description = str(headers.get("Description", ""))
                level = logging.WARNING if "Deleted" in description else logging.DEBUG
                log.log(
                    level, "pull request ended", extra={"stream": self.stream, "why": description}
                )
                if "Deleted" in description:
                    self.consumer_deleted(self.stream)

    async def pump(self) -> None:
        """Ask for more if there is room and no live request covers it."""
        if self.paused() or self.sub is None:
            return
        now = time.monotonic()
        reconnects = int(self.nc.stats.get("reconnects", 0))
        if now >= self.deadline or reconnects != self.reconnects:
            self.credit, self.reconnects = 0, reconnects
        if self.credit > self.low_water or not self.nc.is_connected:
            return
        want = self.cfg.fetch_batch - max(0, self.credit)
        expires = self.cfg.pull_expires_s
        body = orjson.dumps({"batch": want, "expires": int(expires * 1e9)})
        try:
            await self.nc.publish(self.api, body, reply=self.inbox)
        except Exception as exc:  # disconnected: the tick asks again
            log.debug("pull request not sent", extra={"stream": self.stream, "error": repr(exc)})
            return
        self.credit += want
        self.deadline = now + expires

    async def drain(self) -> None:
        if self.sub is not None:
            sub, self.sub = self.sub, None
            try:
                await asyncio.wait_for(sub.drain(), 5)  # type: ignore[no-untyped-call]
            except Exception as exc:
                log.debug("inbox drain failed", extra={"stream": self.stream, "error": repr(exc)})
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
