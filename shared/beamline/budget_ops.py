"""Operator commands against the budget service (`beamline budget show | raise`): one
request on `bl.budget.<command>`, and a plain-text rendering of the accounts.

Raising the budget of a subtree that was stopped for `budget_exhausted` also asks the
supervisor to restart it (`bl.admin.restart`), so its agents carry on from their journals.
"""

from __future__ import annotations

from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from pydantic import BaseModel

from beamline import ops, subjects
from beamline.budget import AccountKind, Budget, BudgetReply, RaiseRequest, ShowRequest
from beamline.errors import BeamlineError, Reason, TransientError, refusal


async def request(nc: NATS, subject: str, body: BaseModel, timeout: float = 10) -> dict[str, Any]:
    """The budget service's result, or a clear error naming what failed."""
    try:
        msg = await nc.request(subject, body.model_dump_json().encode(), timeout=timeout)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
        raise TransientError(
            f"no budget service answered {subject}: is services/budget running?",
            Reason.BUDGET_UNAVAILABLE,
        ) from exc
    reply = BudgetReply.model_validate_json(msg.data)
    if not reply.ok:
        raise refusal(reply.error, reply.reason)
    return reply.result


async def show(nc: NATS, name: str | None = None) -> dict[str, Any]:
    return await request(nc, subjects.BUDGET_SHOW, ShowRequest(name=name))


async def raise_budget(
    nc: NATS,
    name: str,
    budget: Budget,
    kind: AccountKind | None = None,
    requested_by: str = "cli",
    restart: bool = True,
) -> dict[str, Any]:
    """Raise the limits; restart the subtree if it had been stopped for its budget."""
    body = RaiseRequest(kind=kind, name=name, budget=budget, requested_by=requested_by)
    result = await request(nc, subjects.BUDGET_RAISE, body)
    if restart and result.get("was_exhausted"):
        try:
            await ops.admin(nc, "restart", name)
            result["restarted"] = True
        except BeamlineError as exc:  # unsupervised, or no supervisor: the raise still holds
            result["restarted"] = False
            result["restart_error"] = str(exc)
    return result


def render(accounts: list[dict[str, Any]]) -> str:
    rows = [("ACCOUNT", "LIMIT", "SPENT TOKENS", "SPENT USD", "HELD", "EXHAUSTED")]
    for a in accounts:
        limit = ", ".join(f"{k} {v}" for k, v in (a.get("limit") or {}).items()) or "-"
        rows.append(
            (
                a["account"],
                limit,
                str(a["spent_tokens"]),
                f"{a['spent_usd']:.6f}",
                str(a["held_tokens"]),
                "yes" if a["exhausted"] else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
