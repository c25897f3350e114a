"""A completed LLM call is never repeated: results by request envelope id.

Two layers. `ResultStore` keeps successful replies in the `BL_LLM_RESULTS` KV bucket, so an
agent respawned after a crash gets the answer it already paid for. `Singleflight` makes
concurrent duplicates of one id (a redelivery racing the original) share one call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

log = logging.getLogger("services.gateway.idempotency")
T = TypeVar("T")


class ResultStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def get(self, key: str) -> bytes | None:
        """The stored reply for `key`, or None. A KV failure is a miss, not an error: the
        call then runs again, which costs money but never loses a request."""
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        except Exception as exc:
            log.warning("result lookup failed; calling", extra={"key": key, "error": repr(exc)})
            return None
        return entry.value or None

    async def put(self, key: str, value: bytes) -> None:
        try:
            await self._kv.put(key, value)
        except Exception as exc:
            log.warning("result not stored", extra={"key": key, "error": repr(exc)})


class Singleflight(Generic[T]):
    """Run one `work()` per key at a time; callers arriving meanwhile await its result."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future[T]] = {}
        self.shared = 0

    def __len__(self) -> int:
        return len(self._running)

    async def do(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        running = self._running.get(key)
        if running is not None:
            self.shared += 1
            # shield: one impatient duplicate being cancelled must not cancel the call
            return await asyncio.shield(running)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            result = await work()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._running[key]
