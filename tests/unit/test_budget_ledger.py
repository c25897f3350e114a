"""The budget ledger, pure: reservations against a chain of accounts, settlement, expiry,
raises. No NATS, the clock passed in."""

from __future__ import annotations

import random

import pytest

from beamline.budget import (
    Account,
    AccountKind,
    Budget,
    Price,
    ReserveRequest,
    estimate_input_tokens,
)
from beamline.envelope import ChatMessage, LLMRequestPayload
from services.budget.ledger import (
    CONVERSATIONS_MAX,
    CONVERSATIONS_PER_AGENT,
    Deferred,
    Granted,
    Ledger,
    LedgerError,
    LedgerRecord,
    Refused,
)

PRICE = Price(input=1.0, output=2.0)  # USD per million tokens


def chain(agent_tokens: int | None = None, team_usd: float | None = None) -> tuple[Account, ...]:
    return (
        Account(
            kind=AccountKind.AGENT,
            name="a",
            budget=Budget(tokens=agent_tokens) if agent_tokens is not None else None,
        ),
        Account(
            kind=AccountKind.SUPERVISOR,
            name="team",
            budget=Budget(usd=team_usd) if team_usd is not None else None,
        ),
    )


def ask(rid: str, tokens_in: int = 100, tokens_out: int = 100, agent: str = "a") -> ReserveRequest:
    return ReserveRequest(
        request_id=rid,
        agent=agent,
        provider="p",
        model="m",
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        conversation_id="c1",
    )


def test_a_reservation_is_held_on_every_account_of_the_chain() -> None:
    ledger = Ledger()
    outcome = ledger.reserve(ask("r1"), chain(1000), PRICE, now=0, ttl_s=60)
    assert isinstance(outcome, Granted) and outcome.hold.tokens == 200
    assert ledger.held("agent:a").tokens == 200 and ledger.held("supervisor:team").tokens == 200
    assert outcome.hold.usd == pytest.approx(300 / 1_000_000)


def test_concurrent_holds_never_pass_the_limit_together() -> None:
    ledger = Ledger()
    c = chain(500)
    assert isinstance(ledger.reserve(ask("r1"), c, None, 0, 60), Granted)
    assert isinstance(ledger.reserve(ask("r2"), c, None, 0, 60), Granted)
    third = ledger.reserve(ask("r3"), c, None, 0, 60)  # 600 > 500 with the two held
    assert isinstance(third, Deferred) and third.account == "agent:a"
    assert ledger.held("agent:a").tokens == 400 and not ledger.record.exhausted


def test_a_call_held_up_only_by_calls_in_flight_waits_for_them_and_stops_nothing() -> None:
    ledger = Ledger()
    c = chain(500)
    ledger.reserve(ask("r1"), c, None, 0, 60)
    ledger.reserve(ask("r2"), c, None, 0, 60)
    # the spend alone (0) leaves room for 200: wait, do not stop the subtree
    waiting = ledger.reserve(ask("r3"), c, None, 0, 60)
    assert isinstance(waiting, Deferred) and "retry shortly" in waiting.explain()
    ledger.settle("r1", "a", (), 100, 50, None, "c1")  # it cost 150 of its 200
    # 150 spent + 200 held + 200 needed > 500, but the spend alone still leaves room
    assert isinstance(ledger.reserve(ask("r3"), c, None, 0, 60), Deferred)
    ledger.settle("r2", "a", (), 100, 50, None, "c1")
    assert isinstance(ledger.reserve(ask("r3"), c, None, 0, 60), Granted)  # 300 + 200 <= 500
    ledger.settle("r3", "a", (), 150, 50, None, "c1")
    # 500 spent: 200 more can never fit, whatever settles: exhausted
    refused = ledger.reserve(ask("r4"), c, None, 0, 60)
    assert isinstance(refused, Refused) and refused.newly_exhausted


def test_the_same_request_reserved_twice_is_held_once() -> None:
    ledger = Ledger()
    ledger.reserve(ask("r1"), chain(1000), None, 0, 60)
    again = ledger.reserve(ask("r1"), chain(1000), None, 0, 60)
    assert isinstance(again, Granted) and again.again
    assert ledger.held("agent:a").tokens == 200


def test_settling_replaces_the_estimate_with_the_actual_usage() -> None:
    ledger = Ledger()
    ledger.reserve(ask("r1", 100, 500), chain(1000, 1.0), PRICE, 0, 60)
    actual = ledger.settle("r1", "a", (), 90, 30, PRICE, "c1")
    assert actual.tokens == 120 and ledger.held("agent:a").tokens == 0
    assert ledger.spent("agent:a").tokens == 120 == ledger.spent("supervisor:team").tokens
    assert ledger.spent("supervisor:team").usd == pytest.approx(150 / 1_000_000)
    [conv] = ledger.conversations(["a"])
    assert (conv.conversation_id, conv.calls, conv.tokens) == ("c1", 1, 120)


def test_the_partial_results_name_settled_and_in_flight_conversations() -> None:
    ledger = Ledger()
    ledger.reserve(ask("r1"), chain(1000), None, 0, 60)
    ledger.settle("r1", "a", (), 10, 5, None, "c1")
    ledger.reserve(ask("r2").model_copy(update={"conversation_id": "c2"}), chain(1000), None, 0, 60)
    got = {(c.conversation_id, c.calls, c.in_flight) for c in ledger.conversations(["a"])}
    assert got == {("c1", 1, 0), ("c2", 0, 1)}


def test_a_call_without_a_reservation_is_charged_to_the_agents_chain() -> None:
    ledger = Ledger()
    ledger.settle("r9", "a", chain(), 10, 5, None, "c1")
    assert ledger.spent("supervisor:team").tokens == 15


def test_the_outermost_short_account_is_the_subtree_to_stop() -> None:
    ledger = Ledger()
    # the agent (100 tokens) and its team ($0.0001) both cannot cover 200 tokens at $0.0003
    refused = ledger.reserve(ask("r1"), chain(100, 0.0001), PRICE, 0, 60)
    assert isinstance(refused, Refused) and refused.account == "supervisor:team"
    assert "beamline budget raise team --usd N" in refused.explain()


def test_an_exhaustion_is_reported_once_until_the_budget_is_raised() -> None:
    ledger = Ledger()
    c = chain(100)
    first = ledger.reserve(ask("r1"), c, None, 0, 60)
    second = ledger.reserve(ask("r2"), c, None, 0, 60)
    assert isinstance(first, Refused) and first.newly_exhausted
    assert isinstance(second, Refused) and not second.newly_exhausted
    assert list(ledger.unreported()) == ["agent:a"]
    ledger.mark_reported("agent:a")
    assert not ledger.unreported()
    ledger.raise_limit(c[0], Budget(tokens=1000))
    assert isinstance(ledger.reserve(ask("r3"), c, None, 0, 60), Granted)


def test_a_budget_is_raised_but_never_lowered_at_run_time() -> None:
    ledger = Ledger()
    agent = chain(1000)[0]
    assert ledger.raise_limit(agent, Budget(tokens=5000)).tokens == 5000
    with pytest.raises(LedgerError, match="below the current limit 5000"):
        ledger.raise_limit(agent, Budget(tokens=2000))
    # a cost limit added at run time keeps the token limit
    both = ledger.raise_limit(agent, Budget(usd=1.0))
    assert both.tokens == 5000 and both.usd == 1.0


def test_a_failed_call_releases_its_hold() -> None:
    ledger = Ledger()
    ledger.reserve(ask("r1"), chain(1000), None, 0, 60)
    assert ledger.release("r1") is not None
    assert ledger.held("agent:a").tokens == 0 and ledger.spent("agent:a").tokens == 0


def test_an_expired_hold_is_charged_at_its_estimate_and_a_late_outcome_corrects_it() -> None:
    ledger = Ledger()
    ledger.reserve(ask("r1", 100, 400), chain(1000), None, now=0, ttl_s=60)
    assert ledger.expire(now=59, late_window_s=600) == []
    [expired] = ledger.expire(now=61, late_window_s=600)
    assert expired.request_id == "r1" and ledger.spent("agent:a").tokens == 500
    ledger.settle("r1", "a", (), 100, 20, None, "c1")  # the call did finish, late
    assert ledger.spent("agent:a").tokens == 120 and ledger.spent("agent:a").calls == 1
    ledger.expire(now=10_000, late_window_s=600)
    assert not ledger.record.late


def test_the_ledger_round_trips_through_its_record() -> None:
    ledger = Ledger()
    ledger.reserve(ask("r1"), chain(1000), PRICE, 0, 60)
    ledger.settle("r0", "a", chain(1000), 5, 5, PRICE, "c0")
    ledger.raise_limit(chain()[1], Budget(usd=3))
    copy = Ledger(LedgerRecord.model_validate_json(ledger.record.model_dump_json()))
    assert copy.record == ledger.record
    assert copy.held("agent:a").tokens == 200 and copy.spent("agent:a").tokens == 10


def test_the_input_estimate_covers_what_the_provider_counts() -> None:
    text = "x" * 1000
    payload = LLMRequestPayload(
        provider="p",
        model="m",
        messages=(
            ChatMessage(role="system", content="s" * 40),
            ChatMessage(role="user", content=text),
        ),
    )
    # fakellm (like a tokenizer on English) counts about one token per 4 characters
    assert estimate_input_tokens(payload) >= (1040 + 3) // 4


def test_the_itemisation_is_bounded_across_agents_the_busiest_losing_its_oldest() -> None:
    ledger = Ledger()
    for agent in range(CONVERSATIONS_MAX // CONVERSATIONS_PER_AGENT + 5):
        for conv in range(CONVERSATIONS_PER_AGENT + 3):  # past the per-agent bound too
            ledger.settle(f"r{agent}-{conv}", f"a{agent}", chain(), 1, 1, None, f"c{conv}")
    kept = ledger.record.conversations
    assert sum(len(c) for c in kept.values()) == CONVERSATIONS_MAX
    assert all(len(c) <= CONVERSATIONS_PER_AGENT for c in kept.values())
    newest = f"c{CONVERSATIONS_PER_AGENT + 2}"
    assert newest in kept[f"a{CONVERSATIONS_MAX // CONVERSATIONS_PER_AGENT + 4}"]
    # a restarted ledger counts what it reads back, and keeps the bound
    again = Ledger(ledger.record.model_copy(deep=True))
    again.settle("r-more", "a-new", chain(), 1, 1, None, "c-new")
    assert sum(len(c) for c in again.record.conversations.values()) == CONVERSATIONS_MAX


def test_what_is_held_per_account_stays_the_sum_of_the_holds_through_every_change() -> None:
    rng = random.Random(7)
    ledger, now, issued = Ledger(), 0.0, 0

    def summed(key: str) -> tuple[int, float, int]:
        holds = [h for h in ledger.record.holds.values() if key in h.accounts]
        return sum(h.tokens for h in holds), sum(h.usd for h in holds), len(holds)

    for _ in range(2000):
        now += rng.random()
        step = rng.choice(("reserve", "reserve", "settle", "release", "expire"))
        if step == "reserve":
            issued += 1
            ledger.reserve(ask(f"r{issued}", rng.randint(1, 500)), chain(), PRICE, now, ttl_s=20)
        elif step == "expire":
            ledger.expire(now, late_window_s=60)
        elif issued:
            rid = f"r{rng.randint(1, issued)}"  # known, settled already, or expired: any
            if step == "settle":
                ledger.settle(rid, "a", chain(), 10, 10, PRICE, "c1")
            else:
                ledger.release(rid)
        for key in ("agent:a", "supervisor:team"):
            held = ledger.held(key)
            tokens, usd, calls = summed(key)
            assert (held.tokens, held.calls) == (tokens, calls)
            assert held.usd == pytest.approx(usd, abs=1e-9)
    # and a ledger read back from its record counts the same
    again = Ledger(LedgerRecord.model_validate_json(ledger.record.model_dump_json()))
    for key in ("agent:a", "supervisor:team"):
        assert (again.held(key).tokens, again.held(key).calls) == summed(key)[::2]
