"""Operator commands against the supervisor (`beamline ps | tree | inspect | kill |
restart | start-child | terminate-child`): one request on `bl.admin.<command>`, answered by the leading supervisor, and
plain-text renderings of the answers."""

from __future__ import annotations

import json
from typing import Any

from nats.aio.client import Client as NATS

from beamline import operator, subjects
from beamline.control import AdminReply, AdminRequest
from beamline.errors import Reason

SUPERVISOR = operator.Service(
    "supervisor",
    "is one running (`beamline up` with a deployment that declares supervisors)?",
    AdminReply,
    Reason.NATS_UNAVAILABLE,
    timeout=30,
)


async def admin(
    nc: NATS,
    command: str,
    target: str | None = None,
    timeout: float = 30,
    suffixes: tuple[str, ...] = (),
    count: int = 0,
) -> Any:
    """The supervisor's answer, or a clear error: a refused command raises CallerError with
    the supervisor's reason; no supervisor answering raises TransientError."""
    request = AdminRequest(target=target, requested_by="cli", suffixes=suffixes, count=count)
    return await SUPERVISOR.ask(nc, subjects.admin(command), request, timeout)


PS_COLUMNS = (
    ("AGENT", "agent"),
    ("SUPERVISOR", "supervisor"),
    ("HOST", "host"),
    ("STATE", "state"),
    ("PROVIDER", "provider"),
    ("GEN", "generation"),
    ("RESTARTS", "restarts"),
    ("DEPTH", "mailbox_depth"),
    ("STEP", "step"),
    ("TOKENS", "tokens"),
    ("HEARTBEAT", "heartbeat_age_s"),
    ("PID", "pid"),  # an isolated agent's own process; "-" for one sharing its host's
)


def render_ps(rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        if key == "state" and value == "paused" and row.get("paused_on"):
            return f"paused:{row['paused_on']}"  # which provider's open breaker holds it
        return f"{value:.1f}s" if key == "heartbeat_age_s" else str(value)

    lines = operator.table(
        [[h for h, _ in PS_COLUMNS]] + [[cell(r, k) for _, k in PS_COLUMNS] for r in rows]
    )
    breakers = breaker_states(rows)
    if breakers:
        lines.append("breakers: " + ", ".join(f"{p} {s}" for p, s in sorted(breakers.items())))
    return "\n".join(lines)


def breaker_states(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each provider's breaker as the agents' hosts see it; the worst view wins (one host
    may not have heard of a change yet, and an open breaker is the one to notice)."""
    rank = {"closed": 0, "half_open": 1, "open": 2}
    out: dict[str, str] = {}
    for row in rows:
        for provider, state in (row.get("breakers") or {}).items():
            if rank.get(state, 0) >= rank.get(out.get(provider, "closed"), 0):
                out[provider] = state
    return out


def render_tree(node: dict[str, Any], prefix: str = "", last: bool = True, top: bool = True) -> str:
    """The supervision tree with live states, one line per supervisor or agent."""
    branch = "" if top else ("└─ " if last else "├─ ")
    if "supervisor" in node and "strategy" in node:
        state = "up" if node["up"] else "DOWN"
        template = node.get("template")
        pool = f", pool of {template} x{len(node['children'])}" if template else ""
        line = (
            f"{prefix}{branch}{node['supervisor']} ({node['strategy']}{pool}, "
            f"{node['recent_restarts']}/{node['intensity']} restarts in {node['period']:g}s) {state}"
        )
        children = node["children"]
        inner = prefix + ("" if top else ("   " if last else "│  "))
        lines = [line] + [
            render_tree(child, inner, i == len(children) - 1, top=False)
            for i, child in enumerate(children)
        ]
        return "\n".join(lines)
    own = ", own process" if node.get("isolation") == "process" else ""
    return (
        f"{prefix}{branch}{node['agent']} [{node['supervised']}] on {node.get('host') or '-'}"
        f"{own}, generation {node['generation']}, {node['restarts']} restarts ({node['restart']})"
    )


def render_inspect(row: dict[str, Any]) -> str:
    head = {k: v for k, v in row.items() if k not in ("current", "steps", "queued")}
    lines = [json.dumps(head, indent=2, default=str)]
    if row.get("current"):
        current = row["current"]
        lines.append(
            f"current message: {current['id']} ({current['kind']}) in {current['conversation_id']}"
        )
    if row.get("queued"):
        lines.append(f"queued: {len(row['queued'])} ({', '.join(row['queued'][:5])}…)")
    for step in row.get("steps") or []:
        lines.append(f"  {step['ts']}  {step['kind']:<13} {step['text']}")
    return "\n".join(lines)
