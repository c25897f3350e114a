"""Operator commands against the budget service (`beamline budget show | raise`): one
request on `bl.budget.<command>`, and a plain-text rendering of the accounts.

Raising the budget of a subtree that was stopped for `budget_exhausted` also asks the
supervisor to restart it (`bl.admin.restart`), so its agents carry on from their journals.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS

from beamline import operator, ops, subjects
from beamline.budget import AccountKind, Budget, BudgetReply, RaiseRequest, ShowRequest
from beamline.errors import BeamlineError, Reason

BUDGET = operator.Service(
    "budget service",
    "is services/budget running?",
    BudgetReply,
    Reason.BUDGET_UNAVAILABLE,
    timeout=10,
)


async def show(nc: NATS, name: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = await BUDGET.ask(nc, subjects.BUDGET_SHOW, ShowRequest(name=name))
    return result


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
    result: dict[str, Any] = await BUDGET.ask(nc, subjects.BUDGET_RAISE, body)
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
    return "\n".join(operator.table(rows))
