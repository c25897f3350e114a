"""Leader election on NATS KV: one supervisor instance leads, the others stand by.

The leader holds key `leader` in bucket BL_SUPERVISOR and renews it by compare-and-set
every quarter lease. A standby watches the key's revision; when it has not moved for a
whole lease, the standby takes the key over by compare-and-set on the revision it saw, so
of several standbys exactly one wins. No clocks are compared across machines: each side
times the lease with its own monotonic clock.

The revision that won the key is the leader's `term`: it only grows, and hosts refuse
commands carrying a lower term than one they have obeyed, which fences a deposed leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger("beamline.supervisor.lease")

KEY = "leader"


class Lease:
    def __init__(self, kv: KeyValue, instance: str, lease_s: float) -> None:
        self.kv, self.instance, self.lease_s = kv, instance, lease_s
        self.term = 0
        self.revision = 0
        self.leader: str | None = None  # who leads, as last seen

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Stand by until this instance leads (True) or `stop` is set (False)."""
        seen_revision, seen_at = -1, time.monotonic()
        while not stop.is_set():
            try:
                entry = await self.kv.get(KEY)
            except KeyNotFoundError:
                entry = None
            except Exception:  # NATS reconnecting: keep standing by
                entry = None
                await asyncio.sleep(self.lease_s / 4)
                continue
            try:
                if entry is None or entry.value is None or entry.operation is not None:
                    return await self._won(await self.kv.create(KEY, self._value()))
                self.leader = json.loads(entry.value).get("instance")
                now = time.monotonic()
                if entry.revision != seen_revision:
                    seen_revision, seen_at = entry.revision or 0, now
                elif now - seen_at > self.lease_s:
                    log.warning(
                        "leader silent for a lease; taking over",
                        extra={"silent_leader": self.leader, "lease_s": self.lease_s},
                    )
                    return await self._won(
                        await self.kv.update(KEY, self._value(), last=entry.revision)
                    )
            except Exception as exc:  # another standby won the race, or NATS hiccupped
                log.debug("lease not taken", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.lease_s / 10)
        return False

    async def renew(self) -> bool:
        """Extend the lease; False when another instance has taken it."""
        try:
            self.revision = await self.kv.update(KEY, self._value(), last=self.revision)
            return True
        except KeyWrongLastSequenceError:
            return False

    async def release(self) -> None:
        """Give the lease up at a graceful stop, so a standby takes over at once."""
        try:
            await self.kv.delete(KEY, last=self.revision)
        except Exception:
            log.debug("lease not released", exc_info=True)

    async def _won(self, revision: int) -> bool:
        self.term = self.revision = revision
        self.leader = self.instance
        log.info("leading", extra={"instance": self.instance, "term": revision})
        return True

    def _value(self) -> bytes:
        return json.dumps({"instance": self.instance}).encode()
