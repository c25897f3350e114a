"""This host's view of every provider's breaker, shared by all its agents.

It follows the gateway's `BL_BREAKERS` bucket through a watch (the current records first,
then each change), and is corrected by what the host's own calls learn: a call refused with
`circuit_open` marks that provider open now, a call that succeeds marks it closed. Agents
route with `route()` and, when paused, wait with `wait_change()`, which wakes them on any
news or after a bounded time (see failover.py for why that bound keeps nobody stuck).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence

from nats.js.client import JetStreamContext

from beamline import subjects
from beamline.backoff import backoff
from beamline.circuit import BreakerRecord, Circuit
from beamline.config import ModelChoice
from beamline.service import crash_on_error
from services.agent import failover
from services.agent.failover import Route, Seen

log = logging.getLogger("beamline.agent.circuits")

WATCH_RETRY_S = 0.5
WATCH_RETRY_CAP_S = 10.0


class CircuitView:
    def __init__(self, recheck_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.recheck_s = recheck_s
        self.seen: dict[str, Seen] = {}
        self._clock = clock
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def route(self, choices: Sequence[ModelChoice]) -> Route:
        return failover.route(choices, self.seen, self._clock(), self.recheck_s)

    def now(self) -> float:
        return self._clock()

    def learn(self, provider: str, state: Circuit, reason: str = "") -> None:
        self.seen[provider] = Seen(state, self._clock(), reason)
        # wake every waiter: each re-routes with the news
        self._changed.set()
        self._changed = asyncio.Event()

    def learn_record(self, record: BreakerRecord) -> None:
        reason = record.last_error if record.state is Circuit.OPEN and record.last_error else ""
        self.learn(record.provider, record.state, reason or record.reason)

    def refused(self, provider: str, reason: str, sent_at: float) -> None:
        """A call sent at `sent_at` came back `circuit_open`. News that arrived while it was
        in flight (the trial closed the breaker, say) is newer and wins."""
        seen = self.seen.get(provider)
        if seen is None or seen.at <= sent_at:
            self.learn(provider, Circuit.OPEN, reason)

    def succeeded(self, provider: str) -> None:
        seen = self.seen.get(provider)
        if seen is not None and seen.state is not Circuit.CLOSED:
            self.learn(provider, Circuit.CLOSED, "a call succeeded")

    async def wait_change(self, timeout: float) -> None:
        """Return on the next change, or after `timeout` plus up to half of it again: the
        jitter spreads the re-checks of many paused agents, so the first one's refusal
        (which every agent on the host sees) spares the others theirs."""
        changed = self._changed
        delay = timeout + random.uniform(0, timeout / 2)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), delay)

    def states(self, providers: Sequence[str]) -> dict[str, str]:
        return {p: (self.seen[p].state.value if p in self.seen else "closed") for p in providers}

    # --- following the bucket ---------------------------------------------------------

    def start(self, js: JetStreamContext) -> None:
        self._task = asyncio.create_task(self._follow(js), name="agent-breaker-watch")
        self._task.add_done_callback(crash_on_error)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self, js: JetStreamContext) -> None:
        """Watch the bucket for as long as the host runs; a broken watch is re-opened with
        capped backoff (re-opening replays the current records, so nothing is missed)."""
        failures = 0
        while True:
            try:
                kv = await js.key_value(subjects.BUCKET_BREAKERS)
                watcher = await kv.watchall()
                failures = 0
                async for entry in watcher:
                    if entry is None or entry.value is None or entry.operation is not None:
                        continue  # the end-of-replay marker, or a deleted key
                    self._take(entry.value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.warning(
                    "breaker watch lost; re-opening it",
                    extra={"failures": failures, "error": repr(exc)},
                )
            await asyncio.sleep(backoff(failures, WATCH_RETRY_S, WATCH_RETRY_CAP_S))

    def _take(self, value: bytes) -> None:
        try:
            record = BreakerRecord.model_validate_json(value)
        except ValueError as exc:  # not a breaker record: ignore it, keep the rest
            log.warning("unreadable breaker record ignored", extra={"error": repr(exc)})
            return
        log.info(
            "provider breaker state",
            extra={"provider": record.provider, "state": record.state.value},
        )
        self.learn_record(record)
