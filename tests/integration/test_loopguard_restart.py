"""The loop guard in-process on a real nats-server, restarted with its journal position
behind two loops it had acted on (what a kill leaves between two flushes of the position):
it reads those entries again, acts on neither again, and its ladder goes on where it stood.
The supervisor's side of `bl.sup.guard` is a plain responder that records each command."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from beamline import bus, config, subjects
from beamline.envelope import Envelope, Kind, TaskPayload, ToolResultPayload
from beamline.errors import ConfigError
from beamline.guard import GuardCommand, GuardReply
from beamline.testing import wait_for
from services.loopguard.ladder import AgentLadder, GuardState
from services.loopguard.service import LoopguardService
from services.loopguard.settings import LoopguardSettings
from services.loopguard.store import GuardStore, JournalPosition, PositionStore

TREE = Path(__file__).parent / "loopguard.yaml"
# the position is persisted at start and at stop only: a kill loses everything after start
SETTINGS = LoopguardSettings(linger_s=0, position_flush_s=60, retry_s=0.05, tick_s=0.1)


@pytest.fixture(autouse=True)
def fakellm_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEAMLINE_FAKELLM_URL", "http://127.0.0.1:1")  # loopguard.yaml needs it


@pytest.fixture
async def commands(nc: NATS) -> AsyncIterator[list[GuardCommand]]:
    """Every command the loop guard sends the supervisor, each answered as carried out."""
    received: list[GuardCommand] = []

    async def carry_out(msg: Msg) -> None:
        received.append(GuardCommand.model_validate_json(msg.data))
        await msg.respond(GuardReply(state="running").model_dump_json().encode())

    sub = await nc.subscribe(subjects.GUARD, cb=carry_out)
    try:
        yield received
    finally:
        await sub.unsubscribe()


async def start_guard(nc: NATS, settings: LoopguardSettings = SETTINGS) -> LoopguardService:
    kv = await nc.jetstream().key_value(subjects.BUCKET_LOOPGUARD)
    store = GuardStore(kv)
    guard = LoopguardService(
        settings, config.load(TREE), nc, store, await store.load(), PositionStore(kv)
    )
    await guard.start()
    return guard


async def loop(nc: NATS, conversation: str) -> list[int]:
    """A task to `stubborn` and the same tool call three times: journal sequences."""
    task = Envelope(
        kind=Kind.TASK, sender="cli", recipient="stubborn", conversation_id=conversation,
        payload=TaskPayload(prompt="q"),
    )  # fmt: skip
    calls = [
        task.child(
            ToolResultPayload(call_id=f"c{n}", name="search_notes", arguments='{"q": "x"}'),
            sender="tool.search_notes",
            recipient="stubborn",
        )
        for n in range(3)
    ]
    js, subject = nc.jetstream(), subjects.journal("stubborn", conversation)
    return [(await bus.publish(js, subject, env)).seq for env in (task, *calls)]


async def fenced(guard: LoopguardService, seq: int) -> None:
    def done() -> bool:
        ladder = guard.state.agents.get("stubborn")
        return ladder is not None and ladder.carried_out(seq) and guard.feed.seq >= seq

    await wait_for(done, timeout=15, what=f"the loop at {seq} acted on; {guard.status()}")


async def test_a_restart_behind_its_position_acts_on_no_loop_twice(
    nc: NATS, commands: list[GuardCommand]
) -> None:
    guard = await start_guard(nc)
    start = guard.feed.seq
    try:
        first = await loop(nc, "c1")
        await fenced(guard, first[-1])
        second = await loop(nc, "c2")  # after the first fence: counted
        await fenced(guard, second[-1])
    finally:
        await guard.stop()
    assert [c.action.value for c in commands] == ["restart", "suspend"]
    [escalation] = guard.state.open_escalations()

    # killed before it persisted its position: the next start reads both loops again
    kv = await nc.jetstream().key_value(subjects.BUCKET_LOOPGUARD)
    positions = PositionStore(kv)
    await positions.load()
    await positions.save(JournalPosition(seq=start))
    again = await start_guard(nc)
    try:
        await wait_for(lambda: again.feed.seq >= second[-1], timeout=15, what="entries re-read")
        assert again.counts["entries"] == len(first) + len(second)  # read again, all of them
        assert len(commands) == 2 and again.counts["loops"] == 0, again.status()
        assert [e.id for e in again.state.open_escalations()] == [escalation.id]

        # the ladder goes on where it stood: a third loop is escalated again (its last rung)
        third = await loop(nc, "c3")
        await fenced(again, third[-1])
        assert [c.action.value for c in commands] == ["restart", "suspend", "suspend"]
        assert again.counts["loops"] == 1
    finally:
        await again.stop()
    persisted = GuardState.model_validate_json((await kv.get("state")).value or b"{}")
    assert persisted.agents["stubborn"].loops == 3
    assert json.loads((await kv.get("position")).value or b"{}")["seq"] == third[-1]


async def test_an_unreadable_journal_position_stops_the_start_naming_the_key(nc: NATS) -> None:
    kv = await nc.jetstream().key_value(subjects.BUCKET_LOOPGUARD)
    await kv.put("position", b'{"seq": -4}')
    with pytest.raises(ConfigError, match="BL_LOOPGUARD/position"):
        await start_guard(nc)


async def test_a_journal_made_again_under_the_guard_still_has_its_loops_seen(
    nc: NATS, commands: list[GuardCommand]
) -> None:
    # the guard's state and position refer to an older BL_JOURNAL, far past the new one's end
    kv = await nc.jetstream().key_value(subjects.BUCKET_LOOPGUARD)
    state = GuardState(agents={"stubborn": AgentLadder(last_loop_seq=9_000).fenced(9_000, 9_500)})
    await GuardStore(kv).save(state)
    await PositionStore(kv).save(JournalPosition(seq=10_000))
    guard = await start_guard(nc)
    try:
        assert guard.feed.seq < 9_000
        looped = await loop(nc, "c1")
        await fenced(guard, looped[-1])
        assert [c.action.value for c in commands] == ["restart"]
    finally:
        await guard.stop()


async def test_the_position_is_persisted_on_its_timer_while_the_guard_runs(
    nc: NATS, commands: list[GuardCommand]
) -> None:
    guard = await start_guard(nc, SETTINGS.model_copy(update={"position_flush_s": 0.1}))
    kv = await nc.jetstream().key_value(subjects.BUCKET_LOOPGUARD)
    try:
        looped = await loop(nc, "c1")
        await fenced(guard, looped[-1])

        async def persisted() -> bool:
            seq: int = json.loads((await kv.get("position")).value or b"{}")["seq"]
            return seq == looped[-1]

        # without a stop: a kill now would read nothing again
        await wait_for(persisted, timeout=10, what="the position persisted on its timer")
    finally:
        await guard.stop()
