"""The journal against a real JetStream: persisted before remembered, read back in order,
and correct even when its cache forgets a conversation mid-task."""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from beamline import subjects
from beamline.envelope import Envelope, Kind, ReplyPayload, TaskPayload
from services.agent.journal import Journal


def task(conversation: str, i: int) -> Envelope:
    return Envelope(
        kind=Kind.TASK,
        sender="t",
        recipient="a",
        conversation_id=conversation,
        payload=TaskPayload(prompt=f"p{i}"),
    )


async def test_entries_come_back_in_order_from_a_fresh_journal(nc: NATS) -> None:
    first = Journal(nc.jetstream())
    entries = [task("c1", i) for i in range(5)]
    for e in entries:
        await first.append("a", e)
    await first.append("a", entries[2])  # re-journaled after a crash: counted once
    fresh = Journal(nc.jetstream())  # a respawned host: nothing cached
    assert [e.id for e in await fresh.load("a", "c1")] == [e.id for e in entries]
    assert await fresh.load("a", "other") == []


async def test_an_evicted_conversation_still_sees_every_appended_entry(nc: NATS) -> None:
    journal = Journal(nc.jetstream(), cache_size=1)
    t = task("c2", 0)
    await journal.append("a", t)
    await journal.load("a", "elsewhere")  # evicts c2 from the one-slot cache
    reply = t.child(ReplyPayload(task_id=t.id, text="x"), sender="a", recipient="t")
    await journal.append("a", reply)
    assert [e.id for e in await journal.load("a", "c2")] == [t.id, reply.id]


async def test_each_entry_says_how_many_came_before_it_even_from_a_fresh_host(nc: NATS) -> None:
    """`Bl-Entry`: "0" only on a conversation's first entry, which lets the loop guard meet
    a conversation there without reading the journal."""
    js = nc.jetstream()
    journal = Journal(js)
    entries = [task("c3", i) for i in range(3)]
    for e in entries:
        await journal.append("a", e)
    await Journal(js).append("a", task("c3", 3))  # a respawned host: nothing cached
    stored = []
    seq = 1
    while True:
        try:
            raw = await js.get_msg(
                subjects.STREAM_JOURNAL, seq=seq, subject=subjects.journal("a", "c3"), next=True
            )
        except NotFoundError:
            break
        stored.append((raw.headers or {}).get(subjects.H_ENTRY))
        seq = (raw.seq or seq) + 1
    assert stored == ["0", "1", "2", "3"]
