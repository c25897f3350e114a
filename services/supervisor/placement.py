"""Where agents run. Pure functions of (what is placed where, the live hosts and labels).

Two units of placement: a mailbox shard (with every unpinned agent hashed into it) goes to
any live host; a pinned agent (one with placement labels) goes to a live host whose labels
include its own. Both are sticky: what runs on a live host stays there, so a supervisor
failing over moves nothing, and a lost host's share is re-homed to the least loaded eligible
hosts. A host that joins takes shards from the most loaded hosts until it holds its fair
share (`rebalance_shards`), so scaling out spreads the agents; nothing else moves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence


class NoEligibleHost(Exception):
    """Nothing live can run it (no hosts, or none with the labels): it waits for one."""


def assign_shards(shards: int, owners: Mapping[int, str], live: Sequence[str]) -> dict[int, str]:
    """Every shard to a live host: current owners keep theirs, orphans go round the least
    loaded. Empty when no host is live."""
    if not live:
        return {}
    kept = {k: h for k, h in owners.items() if h in live and 0 <= k < shards}
    load = Counter({h: 0 for h in live})
    load.update(kept.values())
    for k in range(shards):
        if k not in kept:
            host = min(sorted(load), key=lambda h: load[h])
            kept[k] = host
            load[host] += 1
    return dict(sorted(kept.items()))


def place_pinned(
    agent: str,
    need: Mapping[str, str],
    current: str | None,
    hosts: Mapping[str, Mapping[str, str]],
    load: Mapping[str, int],
) -> str:
    """The host for a pinned agent: where it is if that host is live and still matches,
    else the least loaded matching host."""
    eligible = sorted(h for h, labels in hosts.items() if need.items() <= labels.items())
    if current in eligible:
        return current
    if not eligible:
        raise NoEligibleHost(
            f"agent {agent!r} needs a host labelled {dict(need)}; live hosts: "
            f"{ {h: dict(v) for h, v in hosts.items()} }"
        )
    return min(eligible, key=lambda h: load.get(h, 0))


def rebalance_shards(owners: Mapping[int, str], live: Sequence[str], joined: str) -> dict[int, str]:
    """Shards for a host that just joined: taken one at a time from the most loaded host
    (its highest-numbered shard) while that host holds more than the newcomer will, until
    the newcomer has its fair share (shards // live hosts). Only the newcomer gains, so only
    the moved shards' agents are disturbed. `owners` is returned unchanged when nothing
    needs to move."""
    if joined not in live:
        return dict(owners)
    load = Counter({h: 0 for h in live})
    load.update(h for h in owners.values() if h in load)
    fair = len(owners) // len(live)
    moved = dict(owners)
    while load[joined] < fair:
        donor = max(sorted(h for h in load if h != joined), key=lambda h: load[h])
        if load[donor] - 1 < load[joined] + 1:
            break  # taking one more would only shift the imbalance
        shard = max(k for k, h in moved.items() if h == donor)
        moved[shard] = joined
        load[donor] -= 1
        load[joined] += 1
    return moved
