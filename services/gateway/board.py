"""The gateway's breaker states, written into the `BL_BREAKERS` bucket for agent hosts.

`put` is synchronous and never blocks (breaker transitions happen inside pybreaker's
synchronous listener). One task writes; only the latest record per provider is kept, so a
burst of transitions while NATS is away ends as the one state that matters now. A failed
write is retried with capped backoff until it succeeds or a newer record replaces it.
"""

from __future__ import annotations

import asyncio
import logging

from nats.js.kv import KeyValue

from beamline.backoff import backoff
from beamline.circuit import BreakerRecord
from beamline.service import finish_then_cancel

log = logging.getLogger("services.gateway.board")

RETRY_S = 0.2
RETRY_CAP_S = 5.0


class BreakerBoard:
    def __init__(self, kv: KeyValue, gateway: str) -> None:
        self._kv, self.gateway = kv, gateway
        self._latest: dict[str, BreakerRecord] = {}
        self._dirty = asyncio.Event()
        self._flushed = asyncio.Event()  # set while nothing waits to be written
        self._flushed.set()
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.failed = 0

    def put(self, record: BreakerRecord) -> None:
        self._latest[record.provider] = record.model_copy(update={"gateway": self.gateway})
        self._flushed.clear()
        self._dirty.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-breaker-board")

    async def close(self, timeout: float) -> None:
        """Write what is pending (up to `timeout` seconds), then stop."""
        await finish_then_cancel(self._task, self._flushed.wait, timeout)

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            for provider, record in list(self._latest.items()):
                try:
                    await self._kv.put(provider, record.to_bytes())
                except Exception as exc:  # NATS reconnecting: keep it and try again
                    self.failed += 1
                    failures += 1
                    delay = backoff(failures, RETRY_S, RETRY_CAP_S)
                    log.warning(
                        "breaker state not written; retrying",
                        extra={"provider": provider, "retry_in_s": delay, "error": repr(exc)},
                    )
                    self._dirty.set()
                    await asyncio.sleep(delay)
                    break
                failures = 0
                self.written += 1
                if self._latest.get(provider) is record:  # not replaced meanwhile
                    del self._latest[provider]
            if not self._latest:
                self._flushed.set()
