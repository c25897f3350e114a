"""The budget ledger's persistence on a real nats-server's KV: the itemisation apart from the
ledger, so a reservation writes a small value whatever the deployment's size."""

from __future__ import annotations

from nats.aio.client import Client as NATS

from beamline import subjects
from beamline.budget import Account, AccountKind, Budget, ReserveRequest
from services.budget.ledger import CONVERSATIONS_PER_AGENT, Ledger, LedgerRecord, Spend
from services.budget.store import ITEMISATION_KEY, KEY, LedgerStore

AGENTS = 250  # 250 x 50 itemised conversations passed KV's 1 MiB value limit in one key


async def test_a_reservation_writes_the_ledger_only_and_a_restart_reads_both_back(
    nc: NATS,
) -> None:
    kv = await nc.jetstream().key_value(subjects.BUCKET_BUDGET)
    store = LedgerStore(kv)
    ledger = Ledger(await store.load())
    chain = (Account(kind=AccountKind.AGENT, name="a0", budget=Budget(tokens=10**9)),)
    for agent in range(AGENTS):
        for conv in range(CONVERSATIONS_PER_AGENT):
            ledger.settle(f"r{agent}-{conv}", f"a{agent}", chain, 10, 5, None, f"c{conv}")
    await store.save(ledger.record)
    await store.save_itemisation(ledger.record)
    itemised = (await kv.get(ITEMISATION_KEY)).value or b""
    assert len(itemised) < 1024 * 1024  # bounded by CONVERSATIONS_MAX, not by the agents

    # a reservation changes the ledger key only, and that value stays small
    before = (await kv.get(ITEMISATION_KEY)).revision
    request = ReserveRequest(
        request_id="r-new", agent="a0", provider="p", model="m", input_tokens=1, output_tokens=1
    )
    ledger.reserve(request, chain, None, now=0, ttl_s=60)
    await store.save(ledger.record)
    assert (await kv.get(ITEMISATION_KEY)).revision == before
    core = (await kv.get(KEY)).value or b""
    assert b"conversations" not in core and len(core) < len(itemised)

    # a restarted service reads both keys back into one ledger
    again = await LedgerStore(kv).load()
    assert again.holds.keys() == {"r-new"}
    assert again.conversations == ledger.record.conversations
    assert again.spent["agent:a0"] == ledger.record.spent["agent:a0"]


async def test_a_ledger_written_before_the_split_keeps_its_itemisation(nc: NATS) -> None:
    kv = await nc.jetstream().key_value(subjects.BUCKET_BUDGET)
    old = LedgerRecord(conversations={"a0": {"c1": Spend(tokens=15, calls=1)}})
    await kv.put(KEY, old.model_dump_json().encode())
    loaded = await LedgerStore(kv).load()
    assert loaded.conversations == old.conversations
