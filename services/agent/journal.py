"""An agent's journal: every step persisted in JetStream before the agent moves on.

Entries live on `bl.journal.<agent>.<conversation>` in stream BL_JOURNAL. Reading uses direct
gets by subject (no consumer is created), so a respawned agent rebuilds a conversation in a
few round trips and a brand-new conversation costs one.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from beamline import bus, subjects
from beamline.envelope import Envelope

log = logging.getLogger("beamline.agent.journal")

# Journal entries were validated when written; a bigger limit than the wire's lets a long
# LLM answer be journaled even when the task that caused it was small.
_ENTRY_MAX_BYTES = 1024 * 1024


class Journal:
    def __init__(self, js: JetStreamContext, cache_size: int = 10_000) -> None:
        self._js = js
        self._cache: OrderedDict[tuple[str, str], list[Envelope]] = OrderedDict()
        self._cache_size = cache_size

    async def load(self, agent: str, conversation: str) -> list[Envelope]:
        key = (agent, conversation)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        entries = await self._read(subjects.journal(agent, conversation))
        self._remember(key, entries)
        return entries

    async def append(self, agent: str, entry: Envelope) -> None:
        """Persist, then remember: an entry is part of the journal only once it is stored."""
        await bus.publish(self._js, subjects.journal(agent, entry.conversation_id), entry)
        entries = await self.load(agent, entry.conversation_id)
        if not any(e.id == entry.id for e in entries):
            entries.append(entry)

    def forget(self, agent: str) -> None:
        for key in [k for k in self._cache if k[0] == agent]:
            del self._cache[key]

    async def _read(self, subject: str) -> list[Envelope]:
        entries: list[Envelope] = []
        seen: set[str] = set()
        seq = 1
        while True:
            try:
                raw = await self._js.get_msg(
                    subjects.STREAM_JOURNAL, seq=seq, subject=subject, next=True, direct=True
                )
            except NotFoundError:
                return entries
            if raw.data is not None and raw.seq is not None:
                env = bus.decode(raw.data, _ENTRY_MAX_BYTES)
                if env.id not in seen:  # a re-journaled step (after a crash) counts once
                    seen.add(env.id)
                    entries.append(env)
            seq = (raw.seq or seq) + 1

    def _remember(self, key: tuple[str, str], entries: list[Envelope]) -> None:
        self._cache[key] = entries
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
