"""An agent's journal: every step persisted in JetStream before the agent moves on.

Entries live on `bl.journal.<agent>.<conversation>` in stream BL_JOURNAL. Reading uses direct
gets by subject (no consumer is created), so a respawned agent rebuilds a conversation in a
few round trips and a brand-new conversation costs one.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from nats.js.client import JetStreamContext

from beamline import bus, subjects
from beamline.envelope import Envelope
from beamline.journal import read_entries

log = logging.getLogger("beamline.agent.journal")


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
        """Persist, then remember: an entry is part of the journal only once it is stored.
        It carries how many entries came before it (`Bl-Entry`; a step journaled again
        after a crash counts the entries before it, itself included, so it never says 0
        unless it is the conversation's first)."""
        entries = await self.load(agent, entry.conversation_id)
        subject = subjects.journal(agent, entry.conversation_id)
        await bus.publish(self._js, subject, entry, {subjects.H_ENTRY: str(len(entries))})
        if not any(e.id == entry.id for e in entries):
            entries.append(entry)

    def forget(self, agent: str) -> None:
        for key in [k for k in self._cache if k[0] == agent]:
            del self._cache[key]

    async def _read(self, subject: str) -> list[Envelope]:
        return [env for _, env in await read_entries(self._js, subject)]

    def _remember(self, key: tuple[str, str], entries: list[Envelope]) -> None:
        self._cache[key] = entries
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
