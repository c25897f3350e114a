"""Placement and host liveness: pure functions, no NATS."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from beamline.control import AgentBeat, AgentState, HostHeartbeat
from services.supervisor.hosts import HostTable
from services.supervisor.placement import (
    NoEligibleHost,
    assign_shards,
    place_pinned,
    rebalance_shards,
)


def test_shards_spread_evenly_over_live_hosts() -> None:
    owners = assign_shards(8, {}, ["a", "b"])
    assert sorted(owners) == list(range(8))
    assert sorted(owners.values()).count("a") == 4


def test_shards_are_sticky_and_only_a_lost_hosts_shards_move() -> None:
    before = assign_shards(6, {}, ["a", "b", "c"])
    after = assign_shards(6, before, ["a", "c"])
    assert {k: h for k, h in after.items() if before[k] != "b"} == {
        k: h for k, h in before.items() if h != "b"
    }
    assert "b" not in after.values()
    assert assign_shards(6, after, ["a", "c", "d"]) == after  # a new host takes nothing


def test_no_live_host_no_assignment() -> None:
    assert assign_shards(4, {0: "a"}, []) == {}


def test_pinned_agent_needs_matching_labels_and_stays_put() -> None:
    hosts = {"hot-1": {"tier": "hot"}, "hot-2": {"tier": "hot"}, "cold": {"tier": "cold"}}
    assert place_pinned("r", {"tier": "hot"}, None, hosts, {"hot-1": 3, "hot-2": 1}) == "hot-2"
    assert place_pinned("r", {"tier": "hot"}, "hot-1", hosts, {"hot-1": 9}) == "hot-1"
    assert place_pinned("r", {"tier": "hot"}, "gone", hosts, {"hot-1": 0, "hot-2": 2}) == "hot-1"
    with pytest.raises(NoEligibleHost, match=re.escape("needs a host labelled {'gpu': 'yes'}")):
        place_pinned("r", {"gpu": "yes"}, None, hosts, {})


def beat(host: str, incarnation: str = "i1", interval: float = 0.25) -> HostHeartbeat:
    return HostHeartbeat(host=host, incarnation=incarnation, interval_s=interval)


def test_a_host_is_lost_after_its_missed_heartbeats() -> None:
    table = HostTable(misses=4)
    assert table.seen(beat("a"), now=0.0) == "joined"
    assert table.seen(beat("a"), now=0.2) is None
    assert table.lost(now=1.1) == []  # 0.9 s of silence < 4 x 0.25 s
    assert table.lost(now=1.3) == ["a"]
    assert table.live() == []
    assert table.seen(beat("a"), now=2.0) == "joined"  # back after being declared lost


def test_a_restarted_host_is_a_new_incarnation() -> None:
    table = HostTable()
    table.seen(beat("a", "i1"), now=0)
    assert table.seen(beat("a", "i2"), now=0.1) == "restarted"


def test_busy_agents_are_known_from_heartbeats() -> None:
    table = HostTable()
    busy = AgentBeat(agent="x", state=AgentState.WAITING_ON_LLM, progress_age_s=3)
    table.seen(HostHeartbeat(host="a", incarnation="i", busy=(busy,)), now=0)
    assert table.hosts["a"].beat.busy[0].progress_age_s == 3


def test_a_joining_host_takes_its_fair_share_from_the_most_loaded() -> None:
    owners = assign_shards(32, {}, ["a"])
    two = rebalance_shards(owners, ["a", "b"], "b")
    assert Counter(two.values()) == {"a": 16, "b": 16}
    assert all(two[k] == "a" for k in range(16))  # the highest shards move, the rest stay
    three = rebalance_shards(two, ["a", "b", "c"], "c")
    assert Counter(three.values()) == {"a": 11, "b": 11, "c": 10}
    assert {k for k, h in three.items() if h != two[k]} == {k for k, h in three.items() if h == "c"}


def test_rebalancing_moves_nothing_when_it_cannot_help() -> None:
    owners = {0: "a", 1: "b"}
    assert rebalance_shards(owners, ["a", "b", "c"], "c") == owners  # fair share is 0
    assert rebalance_shards(owners, ["a", "b"], "b") == owners  # already balanced
    assert rebalance_shards(owners, ["a"], "z") == owners  # not live: nothing for it
    uneven = {0: "a", 1: "a", 2: "a", 3: "b"}
    assert Counter(rebalance_shards(uneven, ["a", "b", "c"], "c").values()) == {
        "a": 2,
        "b": 1,
        "c": 1,
    }
