"""The loop guard's counts rebuilt from the journal (a restarted loop guard, or a
conversation evicted from memory) are the counts it would have had, against a real
JetStream: the state is the trace."""

from __future__ import annotations

from nats.aio.client import Client as NATS

from beamline import bus, subjects
from beamline.envelope import Envelope, Kind, TaskPayload, ToolResultPayload
from beamline.guard import LoopGuard
from services.loopguard.conversations import Conversations
from services.loopguard.detector import observe
from services.loopguard.ladder import AgentLadder

GUARD = LoopGuard()


def call(task: Envelope, n: int, query: str = "x") -> Envelope:
    return task.child(
        ToolResultPayload(call_id=f"c{n}", name="search", arguments=f'{{"q": "{query}"}}'),
        sender="tool.search",
        recipient="a",
    )


async def journal(nc: NATS, entries: list[Envelope]) -> list[int]:
    js = nc.jetstream()
    return [(await bus.publish(js, subjects.journal("a", "c1"), e)).seq for e in entries]


async def test_a_replayed_conversation_counts_as_one_watched_all_along(nc: NATS) -> None:
    task = Envelope(
        kind=Kind.TASK, sender="cli", recipient="a", conversation_id="c1",
        payload=TaskPayload(prompt="q"),
    )  # fmt: skip
    entries = [task, call(task, 1), call(task, 2, "other"), call(task, 3)]
    seqs = await journal(nc, entries)
    third = call(task, 4)
    [seq] = await journal(nc, [third])

    # a loop guard that saw none of it (restarted) replays the conversation up to the entry
    fresh = Conversations(nc.jetstream(), size=10)
    watch = await fresh.watch("a", "c1", seq, GUARD, AgentLadder())
    assert fresh.replayed == 1 and sorted(watch.calls.values()) == [1, 2]
    loop = observe(GUARD, watch, third)
    assert loop is not None and loop.count == 3
    # held in memory now: no second replay; the counts started afresh after the loop
    again = await fresh.watch("a", "c1", seq + 1, GUARD, AgentLadder())
    assert again is watch and fresh.replayed == 1 and watch.calls == {}

    # entries an agent wrote after its loop was seen, before the guard's restart took
    # effect, are fenced off in a replay too
    fenced = AgentLadder().fenced(seqs[0], seqs[-1])
    evicted = Conversations(nc.jetstream(), size=10)
    watch = await evicted.watch("a", "c1", seq, GUARD, fenced)
    assert watch.calls == {} and observe(GUARD, watch, third) is None
