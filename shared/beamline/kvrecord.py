"""A service's whole state as one KV value, replaced by compare-and-set after every change
(the budget ledger, the loop guard's ladders and escalations).

Why one value: the state is small and changes together, and a service restarted (or
killed) reads back exactly what it had answered. Why compare-and-set: a second instance
writing the same key would make both wrong; the revision check makes the loser stop
(`RecordConflict`, the service exits 70) instead of overwriting. An unreadable value stops
the service at start (ConfigError naming the key) rather than starting from nothing.

A write that failed without an answer (NATS went away mid-write) may still have landed:
the next write then finds the revision moved. If the value there is one this service
wrote and was not told about, that is no second writer: it goes on from that revision.

Saves are group-committed: a save that arrives while a write is in flight shares the next
write with every other save that arrived meanwhile. That write takes the record as it is
when it begins, so each caller's change is in the write it waits for, and a burst of
changes (the budget service's concurrent reservations) costs one write, not one each.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Generic, TypeVar

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ValidationError

from beamline.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

log = logging.getLogger("beamline.kvrecord")

MAX_UNANSWERED = 8  # failed writes remembered, for when one of them had landed after all


class RecordConflict(RuntimeError):
    """Another writer changed the record since this service read it."""


class KVRecord(Generic[M]):
    """One key of a bucket holding a `model`; `what` names it in errors ("the budget
    ledger"), `forgets` says what deleting it loses, `service` who writes it."""

    def __init__(
        self,
        kv: KeyValue,
        bucket: str,
        key: str,
        model: type[M],
        *,
        what: str,
        forgets: str,
        service: str,
        exclude: frozenset[str] = frozenset(),
    ) -> None:
        self.kv, self.bucket, self.key, self.model = kv, bucket, key, model
        self.what, self.forgets, self.service = what, forgets, service
        self.exclude = exclude  # fields kept elsewhere (another key), not written here
        self.revision = 0  # 0: the key does not exist yet
        self.writes = 0
        self._record: M | None = None  # what the next write takes
        self._unanswered: list[bytes] = []  # written since the last answered write, no answer
        self._next: asyncio.Future[None] | None = None  # the saves the next write serves
        self._writer: asyncio.Task[None] | None = None

    async def load(self) -> M:
        """The persisted record, or an empty one on a first start."""
        try:
            entry = await self.kv.get(self.key)
        except KeyNotFoundError:
            return self.model()
        self.revision = entry.revision or 0
        try:
            return self.model.model_validate_json(entry.value or b"{}")
        except ValidationError as exc:
            raise ConfigError(
                f"{self.what} in KV {self.bucket}/{self.key} is unreadable ({exc.errors()[0]}"
                f"): fix or delete that key (`nats kv del {self.bucket} {self.key}` "
                f"{self.forgets}) before starting "
                f"the {self.service} service"
            ) from exc

    async def save(self, record: M) -> None:
        """Return once `record`, as it is now or later, is persisted; raise what that write
        raised (RecordConflict, or NATS unavailable: the caller decides what it undoes)."""
        self._record = record
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            # a failure nobody waits for any more (every caller cancelled) is not an error
            self._next.add_done_callback(lambda f: f.cancelled() or f.exception())
        waiting = self._next
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending(), name=f"save {self.key}")
        await asyncio.shield(waiting)  # one caller cancelled does not fail the others

    async def save_or_exit(self, record: M) -> None:
        """`save`; on a conflict the process ends (exit 70): another instance writes this
        record, and going on would answer from state that is not the persisted one."""
        try:
            await self.save(record)
        except RecordConflict:
            log.critical(
                f"{self.what} written by another instance; exiting",
                exc_info=True,
                extra={"bucket": self.bucket, "key": self.key},
            )
            os._exit(70)

    async def _write_pending(self) -> None:
        while self._next is not None and self._record is not None:
            served, self._next = self._next, None
            try:
                await self._write(self._record)
            except asyncio.CancelledError:
                served.cancel()
                raise
            except Exception as exc:
                served.set_exception(exc)
            else:
                served.set_result(None)

    async def _write(self, record: M) -> None:
        data = record.model_dump_json(exclude=set(self.exclude) or None).encode()
        try:
            try:
                self.revision = await self._put(data)
            except KeyWrongLastSequenceError:
                if not await self._landed_unanswered():
                    raise
                self.revision = await self._put(data)
        except KeyWrongLastSequenceError as exc:
            raise RecordConflict(
                f"{self.what} changed under this service (revision {self.revision}): is a "
                f"second {self.service} service running? Run exactly one"
            ) from exc
        except Exception:
            self._unanswered = [*self._unanswered[-(MAX_UNANSWERED - 1) :], data]
            raise
        self._unanswered = []
        self.writes += 1

    async def _put(self, data: bytes) -> int:
        if self.revision == 0:
            return await self.kv.create(self.key, data)
        return await self.kv.update(self.key, data, last=self.revision)

    async def _landed_unanswered(self) -> bool:
        """Whether the key holds a write of this service's that failed unanswered; if so,
        its revision is the one to go on from."""
        if not self._unanswered:
            return False
        entry = await self.kv.get(self.key)
        if entry.value not in self._unanswered:
            return False
        log.warning(
            f"{self.what}: a write thought failed had landed; going on from it",
            extra={"bucket": self.bucket, "key": self.key, "revision": entry.revision},
        )
        self.revision = entry.revision or 0
        return True
