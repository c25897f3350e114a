"""What the operator commands share (`beamline ps`, `budget`, `escalation`): one request to
a service, its reply's result or a clear error naming what failed, and the plain-text
table they print."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS

from beamline.budget import BudgetReply
from beamline.control import AdminReply
from beamline.errors import Reason, TransientError, refusal
from beamline.guard import LoopguardReply

Reply = BudgetReply | LoopguardReply | AdminReply


async def ask(
    nc: NATS,
    subject: str,
    body: bytes,
    reply: type[Reply],
    nobody: tuple[str, str],
    reason: Reason,
    timeout: float,
) -> Any:
    """The reply's result. A refusal raises CallerError with the service's reason; nobody
    answering raises TransientError(`reason`) naming who should have and what to check:
    `nobody` = ("budget service", "is services/budget running?")."""
    try:
        msg = await nc.request(subject, body, timeout=timeout)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
        who, check = nobody
        raise TransientError(f"no {who} answered {subject}: {check}", reason) from exc
    answer = reply.model_validate_json(msg.data)
    if not answer.ok:
        raise refusal(answer.error, answer.reason)
    return answer.result


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, the first row the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
