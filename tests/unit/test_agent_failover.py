"""Failover routing, pure: which provider a call goes to, when an agent pauses, and which
decisions it reports. No NATS, an injected clock."""

from __future__ import annotations

import asyncio

from beamline.circuit import BreakerRecord, Circuit
from beamline.config import ModelChoice
from beamline.ops import breaker_states, render_ps
from services.agent import failover
from services.agent.circuits import CircuitView
from services.agent.failover import Pause, Seen, Use

A = ModelChoice(provider="a", model="m-a")
B = ModelChoice(provider="b", model="m-b")
RECHECK = 10.0


def route(
    seen: dict[str, Seen], now: float = 100.0, choices: tuple[ModelChoice, ...] = (A, B)
) -> failover.Route:
    return failover.route(choices, seen, now, RECHECK)


def test_calls_go_to_the_first_choice_when_nothing_is_known_or_all_is_closed() -> None:
    assert route({}) == Use(A, 0)
    assert route({"a": Seen(Circuit.CLOSED, 99.0)}) == Use(A, 0)


def test_an_open_breaker_moves_calls_to_the_next_choice_in_order() -> None:
    decision = route({"a": Seen(Circuit.OPEN, 99.0, "HTTP 500")})
    assert decision == Use(B, 1, skipped=("a",))


def test_a_half_open_breaker_takes_calls_again_so_one_can_be_the_trial() -> None:
    assert route({"a": Seen(Circuit.HALF_OPEN, 99.0)}) == Use(A, 0)


def test_with_every_choice_open_the_agent_pauses_on_its_preferred_provider() -> None:
    seen = {"a": Seen(Circuit.OPEN, 95.0, "read timeout"), "b": Seen(Circuit.OPEN, 98.0)}
    decision = route(seen)
    assert isinstance(decision, Pause)
    assert decision.provider == "a"
    assert "'a' is open (read timeout)" in decision.reason and "'b' is open" in decision.reason
    assert decision.recheck_in_s == 5.0  # a's open state is the first worth re-checking


def test_a_single_provider_agent_pauses_and_an_old_open_state_is_worth_a_try() -> None:
    seen = {"a": Seen(Circuit.OPEN, 100.0)}
    assert isinstance(route(seen, 105.0, (A,)), Pause)
    # a missed "half-open" or "closed" cannot keep it paused: after recheck_s it tries
    assert route(seen, 110.0, (A,)) == Use(A, 0)


def test_decisions_report_pause_once_and_resume_only_after_a_successful_call() -> None:
    seen = {"a": Seen(Circuit.OPEN, 99.0, "HTTP 503")}
    pause = route(seen, choices=(A,))
    (paused,) = failover.decisions("ag", (A,), None, None, pause, seen)
    assert paused.name == "agent_paused"
    assert paused.data["agent"] == "ag" and paused.data["provider"] == "a"
    assert "HTTP 503" in paused.data["reason"]
    assert failover.decisions("ag", (A,), None, "a", pause, seen) == []  # said already
    probe = Use(A, 0)
    assert failover.decisions("ag", (A,), "a", "a", probe, seen) == []  # a probe is no resume
    resumed = failover.resumed("ag", "a", "a", 3.21)
    assert resumed.name == "agent_resumed" and resumed.data["paused_s"] == 3.21


def test_decisions_report_failing_over_and_back_with_the_reason() -> None:
    seen = {"a": Seen(Circuit.OPEN, 99.0, "HTTP 500")}
    (over,) = failover.decisions("ag", (A, B), None, None, route(seen), seen)
    assert over.name == "agent_failed_over"
    assert over.data == {"agent": "ag", "provider": "b", "from": "a", "reason": over.data["reason"]}
    assert "HTTP 500" in over.data["reason"]
    assert failover.decisions("ag", (A, B), "b", None, route(seen), seen) == []  # still on b
    seen = {"a": Seen(Circuit.CLOSED, 120.0)}
    (back,) = failover.decisions("ag", (A, B), "b", None, route(seen), seen)
    assert back.name == "agent_failed_back"
    assert back.data["provider"] == "a" and back.data["from"] == "b"
    assert "closed" in back.data["reason"]


async def test_the_view_learns_records_refusals_and_successes() -> None:
    now = [100.0]
    view = CircuitView(RECHECK, clock=lambda: now[0])
    view.learn_record(BreakerRecord(provider="a", state=Circuit.OPEN, last_error="HTTP 500"))
    assert view.route((A, B)) == Use(B, 1, skipped=("a",))
    assert view.seen["a"].reason == "HTTP 500"
    view.learn_record(BreakerRecord(provider="a", state=Circuit.CLOSED, reason="trial ok"))
    # a refusal sent before that news arrived is older news: the closed state stands
    view.refused("a", "circuit open", sent_at=99.0)
    assert view.seen["a"].state is Circuit.CLOSED
    now[0] = 101.0
    view.refused("a", "circuit open", sent_at=100.5)
    assert view.states(["a"]) == {"a": "open"}
    view.succeeded("a")
    assert view.seen["a"].state is Circuit.CLOSED
    assert view.states(["a", "b"]) == {"a": "closed", "b": "closed"}


async def test_a_record_from_a_newer_gateway_is_read_and_an_unreadable_one_ignored() -> None:
    view = CircuitView(RECHECK)
    view._take(b'{"provider": "a", "state": "open", "opened_by": "a newer field"}')
    assert view.states(["a"]) == {"a": "open"}
    view._take(b'{"provider": "a", "state": "melted"}')
    view._take(b"not json")
    assert view.states(["a"]) == {"a": "open"}


async def test_a_paused_agent_wakes_on_news_before_its_recheck_time() -> None:
    view = CircuitView(RECHECK)
    waiter = asyncio.create_task(view.wait_change(30.0))
    await asyncio.sleep(0)
    view.learn("a", Circuit.HALF_OPEN)
    await asyncio.wait_for(waiter, 1.0)


def test_ps_shows_the_provider_in_use_the_pause_and_each_breaker() -> None:
    rows = [
        {"agent": "x", "state": "idle", "provider": "b", "breakers": {"a": "open", "b": "closed"}},
        {"agent": "y", "state": "paused", "paused_on": "a", "breakers": {"a": "half_open"}},
    ]
    assert breaker_states(rows) == {"a": "open", "b": "closed"}  # the worst view wins
    text = render_ps(rows)
    assert "PROVIDER" in text.splitlines()[0]
    assert "paused:a" in text
    assert text.splitlines()[-1] == "breakers: a open, b closed"
