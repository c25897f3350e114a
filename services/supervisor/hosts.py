"""The hosts the supervisor can see, from their heartbeats. Pure: the clock is passed in.

A host is lost when it has missed `misses` heartbeats (its own announced interval), or
when it comes back with a new incarnation (it restarted: what it ran is gone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from beamline.control import HostHeartbeat


@dataclass
class HostView:
    beat: HostHeartbeat
    seen_at: float

    @property
    def labels(self) -> dict[str, str]:
        return self.beat.labels

    def matches(self, need: dict[str, str]) -> bool:
        return need.items() <= self.beat.labels.items()


@dataclass
class HostTable:
    misses: int = 4
    hosts: dict[str, HostView] = field(default_factory=dict)

    def seen(self, beat: HostHeartbeat, now: float) -> str | None:
        """Record a heartbeat. Returns "joined" for a new host, "restarted" for a host with a
        new incarnation (the old one is lost with everything it ran), else None."""
        old = self.hosts.get(beat.host)
        self.hosts[beat.host] = HostView(beat, now)
        if old is None:
            return "joined"
        if old.beat.incarnation != beat.incarnation:
            return "restarted"
        return None

    def lost(self, now: float) -> list[str]:
        """Hosts silent for `misses` of their heartbeat intervals; forgotten here."""
        gone = [
            name
            for name, view in self.hosts.items()
            if now - view.seen_at > self.misses * view.beat.interval_s
        ]
        for name in gone:
            del self.hosts[name]
        return gone

    def live(self) -> list[str]:
        return sorted(self.hosts)

    def labels(self) -> dict[str, dict[str, str]]:
        return {name: view.labels for name, view in self.hosts.items()}
