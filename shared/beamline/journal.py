"""Reading an agent's journal of one conversation back from `BL_JOURNAL`: what a respawned
agent rebuilds its state from, and what the loop guard replays a conversation from.

Direct gets by subject (no consumer is created): a conversation costs a round trip per
entry, a brand-new one a single round trip.
"""

from __future__ import annotations

from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from beamline import bus, subjects
from beamline.envelope import Envelope

# Journal entries were validated when written; a bigger limit than the wire's lets a long
# LLM answer be journaled even when the task that caused it was small.
ENTRY_MAX_BYTES = 1024 * 1024


async def read_entries(
    js: JetStreamContext, subject: str, below: int | None = None
) -> list[tuple[int, Envelope]]:
    """The entries stored on `subject` (one agent's conversation), oldest first, each with
    its stream sequence; only those below sequence `below` when given. A step journaled
    twice (after a crash, past JetStream's de-duplication window) counts once."""
    entries: list[tuple[int, Envelope]] = []
    seen: set[str] = set()
    seq = 1
    while below is None or seq < below:
        try:
            raw = await js.get_msg(
                subjects.STREAM_JOURNAL, seq=seq, subject=subject, next=True, direct=True
            )
        except NotFoundError:
            return entries
        if raw.seq is None or (below is not None and raw.seq >= below):
            return entries
        if raw.data is not None:
            env = bus.decode(raw.data, ENTRY_MAX_BYTES)
            if env.id not in seen:
                seen.add(env.id)
                entries.append((raw.seq, env))
        seq = raw.seq + 1
    return entries
