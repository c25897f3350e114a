"""Which provider an agent's next LLM call goes to, and what that decision means. Pure.

An agent's `models:` is its ordered choice list. A call goes to the first choice whose
breaker is not known to be open; if every one is open the agent pauses. An open breaker
that this host learned about more than `recheck_s` ago counts as worth one more try: the
gateway refuses such a call at once (no HTTP) when the breaker is still open, or admits it
as the trial call when it has half-opened. So a host that missed a state change is never
stuck: the worst case is one cheap refused request per `recheck_s`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from beamline.circuit import Circuit
from beamline.config import ModelChoice


@dataclass(frozen=True)
class Seen:
    """What this host knows of one provider's breaker."""

    state: Circuit
    at: float  # clock() when it learned this
    reason: str = ""


@dataclass(frozen=True)
class Use:
    choice: ModelChoice
    index: int  # position in `models:`; 0 is the preferred provider
    skipped: tuple[str, ...] = ()  # providers before it whose breakers are open

    @property
    def provider(self) -> str:
        return self.choice.provider


@dataclass(frozen=True)
class Pause:
    provider: str  # the preferred provider: the one the agent waits for first
    reason: str
    recheck_in_s: float  # when an open breaker is next worth a try, failing any news


Route = Use | Pause


def usable(seen: Seen | None, now: float, recheck_s: float) -> bool:
    """Unknown, closed and half-open breakers take calls; an open one after `recheck_s`."""
    return seen is None or seen.state is not Circuit.OPEN or now - seen.at >= recheck_s


def route(
    choices: Sequence[ModelChoice], seen: Mapping[str, Seen], now: float, recheck_s: float
) -> Route:
    skipped: list[str] = []
    for index, choice in enumerate(choices):
        if usable(seen.get(choice.provider), now, recheck_s):
            return Use(choice, index, tuple(skipped))
        skipped.append(choice.provider)
    waits = [recheck_s - (now - seen[p].at) for p in skipped]
    return Pause(choices[0].provider, why_open(skipped, seen), max(0.0, min(waits)))


def why_open(providers: Sequence[str], seen: Mapping[str, Seen]) -> str:
    parts = []
    for provider in dict.fromkeys(providers):
        detail = seen[provider].reason if provider in seen else ""
        parts.append(f"breaker of {provider!r} is open" + (f" ({detail})" if detail else ""))
    return "; ".join(parts)


@dataclass(frozen=True)
class Decision:
    """An event an agent reports about its routing: name and data."""

    name: str
    data: dict[str, Any]


def decisions(
    agent: str,
    choices: Sequence[ModelChoice],
    previous: str | None,
    paused_on: str | None,
    now_route: Route,
    seen: Mapping[str, Seen],
) -> list[Decision]:
    """What a new route changes: paused, failed over, failed back, or nothing. The agent
    reports a failover or failback once a call on the route succeeds (a call refused while
    another agent's trial runs changes nothing), and a pause at once.

    `previous` is the provider of its last call (None: none yet, the preferred one was
    meant), `paused_on` the provider it is paused on (None: not paused). A paused agent's
    call is only a probe: it resumes when that call succeeds (`resumed`), not before, so a
    probe refused while another agent's trial runs does not make it flap."""
    providers = [c.provider for c in choices]
    if isinstance(now_route, Pause):
        if paused_on is not None:
            return []  # still paused: said already
        data = {"agent": agent, "provider": now_route.provider, "reason": now_route.reason}
        return [Decision("agent_paused", {**data, "choices": providers})]
    if paused_on is not None:
        return []
    before = previous if previous in providers else providers[0]
    moved = {"agent": agent, "provider": now_route.provider, "from": before}
    if now_route.index > providers.index(before):
        why = why_open(now_route.skipped, seen)
        return [Decision("agent_failed_over", {**moved, "reason": why})]
    if now_route.index < providers.index(before):
        state = seen.get(now_route.provider)
        here = f"breaker of {now_route.provider!r} is {state.state.value if state else 'closed'}"
        return [Decision("agent_failed_back", {**moved, "reason": here})]
    return []


def resumed(agent: str, provider: str, paused_on: str, paused_s: float) -> Decision:
    """A paused agent's probe call succeeded."""
    return Decision(
        "agent_resumed",
        {
            "agent": agent,
            "provider": provider,
            "paused_on": paused_on,
            "paused_s": round(paused_s, 3),
            "reason": f"a call to {provider!r} succeeded",
        },
    )
