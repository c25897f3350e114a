"""The budget service's NATS shell in-process, on a real nats-server (its KV bucket and the
gateway's event stream): concurrent reservations answered together with their writes
shared, a call event settled once however often it is handed in, and the itemisation
persisted on its timer and at stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from beamline import bus, config, subjects
from beamline.envelope import Envelope, EventPayload, Kind
from beamline.testing import NatsServer, wait_for
from services.budget import service as budget_service
from services.budget.ledger import Ledger
from services.budget.service import GATEWAY_EVENTS, BudgetService
from services.budget.settings import BudgetSettings
from services.budget.store import ITEMISATION_KEY, KEY, LedgerStore

TREE = Path(__file__).parent / "budget.yaml"
FLUSH_S = 0.2


POOL = """
version: 1
providers:
  fakellm: {kind: openai, base_url: "http://127.0.0.1:1/v1", context_window: 128000}
agents:
  - {name: worker, role: w, models: [{provider: fakellm, model: m}], budget: {tokens: 1000}}
supervisors:
  - {name: pool, strategy: simple_one_for_one, children: [{agent: worker}]}
"""


async def start_budget(
    nc: NATS, itemisation_flush_s: float = FLUSH_S, tree: Path = TREE
) -> BudgetService:
    store = LedgerStore(await nc.jetstream().key_value(subjects.BUCKET_BUDGET))
    settings = BudgetSettings(itemisation_flush_s=itemisation_flush_s, settle_linger_s=0)
    budget = BudgetService(settings, config.load(tree), nc, store, Ledger(await store.load()))
    await budget.start()
    return budget


@pytest.fixture(autouse=True)
def fakellm_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEAMLINE_FAKELLM_URL", "http://127.0.0.1:1")  # budget.yaml needs it


@pytest.fixture
async def service(nc: NATS) -> AsyncIterator[BudgetService]:
    budget = await start_budget(nc)
    try:
        yield budget
    finally:
        await budget.stop()


async def reserve(nc: NATS, request_id: str, agent: str = "free") -> dict[str, object]:
    body = {
        "request_id": request_id,
        "agent": agent,
        "provider": "fakellm",
        "model": "m",
        "input_tokens": 10,
        "output_tokens": 5,
        "conversation_id": f"conv-{request_id}",
    }
    msg = await nc.request(subjects.BUDGET_RESERVE, json.dumps(body).encode(), timeout=10)
    answer: dict[str, object] = json.loads(msg.data)
    return answer


async def completed(nc: NATS, request_id: str, agent: str, conversation: str) -> None:
    env = Envelope(
        kind=Kind.EVENT,
        sender="gateway",
        recipient="budget",
        conversation_id=conversation,
        payload=EventPayload(
            name="llm_call_completed",
            data={
                "request_id": request_id,
                "provider": "fakellm",
                "model": "m",
                "agent": agent,
                "input_tokens": 7,
                "output_tokens": 3,
            },
        ),
    )
    await bus.publish(nc.jetstream(), subjects.LLM_CALL_COMPLETED, env)


async def test_concurrent_reservations_are_granted_together_and_share_their_writes(
    nc: NATS, service: BudgetService
) -> None:
    answers = await asyncio.gather(*(reserve(nc, f"r{i}", "spender") for i in range(30)))
    # spender's 300 tokens cover 20 holds of 15; the rest wait for calls in flight
    granted = [a for a in answers if a["ok"]]
    assert len(granted) == 20
    assert all(a["reason"] == "budget_held" for a in answers if not a["ok"])
    assert service.store.core.writes < len(granted)  # group-committed
    kv = await nc.jetstream().key_value(subjects.BUCKET_BUDGET)
    persisted = json.loads((await kv.get(KEY)).value or b"{}")
    assert len(persisted["holds"]) == 20  # every answered grant is in the persisted ledger

    # a repeat of a granted request is granted again, and holds nothing more
    again = await reserve(nc, "r0", "spender")
    assert again["ok"] and len(service.ledger.record.holds) == 20


async def test_a_call_event_is_settled_once_and_its_itemisation_persisted_on_the_timer(
    nc: NATS, service: BudgetService
) -> None:
    assert (await reserve(nc, "call-1"))["ok"]
    await completed(nc, "call-1", "free", "conv-call-1")
    await wait_for(lambda: _settled(service, "agent:free", 10), timeout=10, what="the call settled")
    assert "call-1" not in service.ledger.record.holds

    # handed in again (the feed hands a batch over again when its ledger write failed, or
    # a restart reads events again): charged once
    js = nc.jetstream()
    again = await js.pull_subscribe(
        GATEWAY_EVENTS,
        durable="test-again",
        stream=subjects.STREAM_EVENTS,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    await service._settle(await again.fetch(10, timeout=5))
    assert service.ledger.spent("agent:free").tokens == 10

    # the itemisation reaches KV within its flush interval, without a stop
    kv = await js.key_value(subjects.BUCKET_BUDGET)

    async def itemised() -> bool:
        try:
            value = (await kv.get(ITEMISATION_KEY)).value or b"{}"
        except Exception:
            return False
        return "conv-call-1" in json.loads(value)["conversations"].get("free", {})

    await wait_for(itemised, timeout=FLUSH_S * 20, what="the itemisation persisted")


async def test_the_itemisation_is_persisted_at_stop(nc: NATS) -> None:
    service = await start_budget(nc, itemisation_flush_s=3600)  # the timer will not do it
    try:
        assert (await reserve(nc, "call-2"))["ok"]
        await completed(nc, "call-2", "free", "conv-call-2")
        await wait_for(lambda: _settled(service, "agent:free", 10), timeout=10, what="settled")
    finally:
        await service.stop()
    kv = await nc.jetstream().key_value(subjects.BUCKET_BUDGET)
    loaded = await LedgerStore(kv).load()
    assert "conv-call-2" in loaded.conversations["free"]
    assert loaded.spent["agent:free"].tokens == 10


async def test_calls_completed_while_it_was_down_are_settled_once_after_a_restart(
    nc: NATS,
) -> None:
    service = await start_budget(nc)
    try:
        assert (await reserve(nc, "call-a"))["ok"] and (await reserve(nc, "call-b"))["ok"]
        await completed(nc, "call-a", "free", "conv-a")
        await wait_for(lambda: _settled(service, "agent:free", 10), timeout=10, what="settled")
    finally:
        await service.stop()
    await completed(nc, "call-b", "free", "conv-b")  # nobody is reading the events
    # and the consumer delivered it into the void (a crash with a batch in hand, or a pull
    # answered into a lost connection): the ledger, not the consumer, says what was applied
    lost = await nc.jetstream().pull_subscribe_bind(
        durable=subjects.CONSUMER_BUDGET, stream=subjects.STREAM_EVENTS
    )
    assert len(await lost.fetch(1, timeout=5)) == 1
    await lost.unsubscribe()

    again = await start_budget(nc)
    try:
        # call-a is not charged again: the consumer resumes after the ledger's applied_seq
        await wait_for(lambda: _settled(again, "agent:free", 20), timeout=10, what="call-b")
        assert again.ledger.record.holds == {}
        await asyncio.sleep(0.3)  # a second charge of call-a would show by now
        assert again.ledger.spent("agent:free").tokens == 20
        info = await nc.jetstream().consumer_info(subjects.STREAM_EVENTS, subjects.CONSUMER_BUDGET)
        assert info.config.ack_policy == AckPolicy.NONE  # the ledger is the position
    finally:
        await again.stop()


async def test_a_ledger_ahead_of_a_remade_event_stream_still_settles_new_calls(
    nc: NATS,
) -> None:
    # BL_EVENTS deleted and made again: its sequence starts afresh under the ledger's
    store = LedgerStore(await nc.jetstream().key_value(subjects.BUCKET_BUDGET))
    record = await store.load()
    record.applied_seq = 10_000
    await store.save(record)
    service = await start_budget(nc)
    try:
        assert service.ledger.record.applied_seq < 10_000
        assert (await reserve(nc, "fresh"))["ok"]
        await completed(nc, "fresh", "free", "conv-fresh")
        await wait_for(lambda: _settled(service, "agent:free", 10), timeout=10, what="settled")
    finally:
        await service.stop()


async def test_with_its_bucket_gone_a_raise_or_a_grant_is_refused_and_undone(
    nc: NATS, service: BudgetService
) -> None:
    js = nc.jetstream()
    assert (await reserve(nc, "before"))["ok"]
    await js.delete_key_value(subjects.BUCKET_BUDGET)  # KV lost (an operator, a bad restore)

    answer = await reserve(nc, "during")
    assert not answer["ok"] and answer["reason"] == "budget_unavailable"
    assert "could not be persisted" in str(answer["error"]) and "nothing was granted" in str(
        answer["error"]
    )
    assert "during" not in service.ledger.record.holds

    raised = await nc.request(
        subjects.BUDGET_RAISE, b'{"name": "spender", "budget": {"tokens": 900}}', timeout=10
    )
    assert json.loads(raised.data)["reason"] == "budget_unavailable"
    shown = await nc.request(subjects.BUDGET_SHOW, b'{"name": "spender"}', timeout=10)
    [spender] = json.loads(shown.data)["result"]["accounts"]
    assert spender["limit"] == {"tokens": 300}  # as in the file: the raise did not stay
    assert "agent:spender" not in service.ledger.record.raised


async def test_budget_show_lists_the_pool_members_that_spent_or_hold(
    nc: NATS, tmp_path: Path
) -> None:
    tree = tmp_path / "pool.yaml"
    tree.write_text(POOL)
    service = await start_budget(nc, tree=tree)
    try:
        assert (await reserve(nc, "w7-call", "worker-7"))["ok"]
        await completed(nc, "w7-call", "worker-7", "conv-w7")
        await wait_for(lambda: _settled(service, "agent:worker-7", 10), timeout=10, what="settled")
        assert (await reserve(nc, "w8-call", "worker-8"))["ok"]  # in flight: held only
        shown = await nc.request(subjects.BUDGET_SHOW, b"{}", timeout=10)
    finally:
        await service.stop()
    rows = {r["account"]: r for r in json.loads(shown.data)["result"]["accounts"]}
    assert rows["agent:worker-7"]["spent_tokens"] == 10
    assert rows["agent:worker-7"]["limit"] == {"tokens": 1000}  # its template's budget
    assert rows["agent:worker-8"]["held_tokens"] == 15
    assert "agent:worker" in rows  # the template itself, as declared


async def _settled(service: BudgetService, key: str, tokens: int) -> bool:
    return service.ledger.spent(key).tokens == tokens


async def test_nats_down_while_a_hold_expires_ends_nothing_and_the_expiry_is_written_after(
    nc: NATS, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended: list[str] = []  # a loop that dies takes the process down (exit 70): seen here

    def crashed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            ended.append(f"{task.get_name()}: {task.exception()!r}")

    monkeypatch.setattr(budget_service, "crash_on_error", crashed)
    settings = BudgetSettings(reservation_ttl_s=0.5, sweep_s=0.1, settle_linger_s=0)
    # writes give up after 1 s (5 by default): NATS stays down longer than that
    store = LedgerStore(await nc.jetstream(timeout=1.0).key_value(subjects.BUCKET_BUDGET))
    service = BudgetService(settings, config.load(TREE), nc, store, Ledger(await store.load()))
    await service.start()
    try:
        assert (await reserve(nc, "unsettled"))["ok"]
        await asyncio.to_thread(nats_server.stop)
        # expired meanwhile: charged in memory, its write fails
        await wait_for(lambda: "expired reservations not persisted" in str(service.last_error),
                       timeout=10, what="a failed write")  # fmt: skip
        await asyncio.to_thread(nats_server.start)
        await wait_for(lambda: nc.is_connected, timeout=15, what="the client reconnected")
        kv = await nc.jetstream().key_value(subjects.BUCKET_BUDGET)

        async def written() -> bool:
            ledger = json.loads((await kv.get(KEY)).value or b"{}")
            return "unsettled" in ledger["late"] and ledger["spent"]["agent:free"]["tokens"] == 15

        await wait_for(written, timeout=20, what=f"the expiry persisted; {service.status()}")
        expired = await _events(nc, "reservation_expired")
        assert [e["request_id"] for e in expired] == ["unsettled"]
        assert ended == [] and service.counts["expired"] == 1
    finally:
        await service.stop()


async def _events(nc: NATS, name: str) -> list[dict[str, object]]:
    """Every `name` event the budget service published (read after it was)."""

    async def found() -> list[dict[str, object]]:
        sub = await nc.jetstream().subscribe(
            subjects.event("budget", name), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        try:
            msgs = []
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                while True:
                    msgs.append(json.loads((await sub.next_msg(timeout=0.5)).data))
        finally:
            await sub.unsubscribe()
        return [m["payload"]["data"] for m in msgs]

    events: list[dict[str, object]] = await wait_for(found, timeout=10, what=f"{name} events")
    return events
