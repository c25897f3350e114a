"""Operator commands against the loop guard (`beamline escalation list | answer`): one
request on `bl.loopguard.<command>`, and a plain-text rendering of the escalations."""

from __future__ import annotations

import time
from typing import Any

from nats.aio.client import Client as NATS

from beamline import operator, subjects
from beamline.errors import Reason
from beamline.guard import AnswerRequest, ListRequest, LoopguardReply, OnTimeout

LOOP_GUARD = operator.Service(
    "loop guard",
    "is services/loopguard running?",
    LoopguardReply,
    Reason.NATS_UNAVAILABLE,
    timeout=30,
)


async def list_escalations(
    nc: NATS, agent: str | None = None, include_closed: bool = False
) -> list[dict[str, Any]]:
    body = ListRequest(agent=agent, include_closed=include_closed)
    found: list[dict[str, Any]] = (await LOOP_GUARD.ask(nc, subjects.LOOPGUARD_LIST, body))[
        "escalations"
    ]
    return found


async def answer(
    nc: NATS, escalation: str, action: OnTimeout, say: str | None = None, by: str = "cli"
) -> dict[str, Any]:
    body = AnswerRequest(id=escalation, action=action, say=say, answered_by=by)
    result: dict[str, Any] = await LOOP_GUARD.ask(nc, subjects.LOOPGUARD_ANSWER, body)
    return result


def render(escalations: list[dict[str, Any]], now: float | None = None) -> str:
    if not escalations:
        return "(no escalations)"
    now = time.time() if now is None else now
    rows = [("ID", "AGENT", "STATUS", "DEADLINE", "CONVERSATION", "WHAT REPEATED")]
    for e in escalations:
        loop = e["loop"]
        what = (
            f"{loop['tool']}({loop['arguments']}) x{loop['count']}"
            if loop.get("tool")
            else f"output x{loop['count']}: {(loop.get('text') or '')[:40]}"
        )
        status = e["status"] if e["status"] == "open" else f"{e['status']}:{e['outcome']}"
        left = e["deadline"] - now
        deadline = f"in {left:.0f}s, then {e['on_timeout']}" if e["status"] == "open" else "-"
        rows.append((e["id"], e["agent"], status, deadline, e["conversation_id"], what))
    return "\n".join(operator.table(rows))
