"""What the operator commands share (`beamline ps`, `budget`, `escalation`): one request to
a service, its reply's result or a clear error naming what failed, and the plain-text
table they print."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from pydantic import BaseModel

from beamline.budget import BudgetReply
from beamline.control import AdminReply
from beamline.errors import Reason, TransientError, refusal
from beamline.guard import LoopguardReply

Reply = BudgetReply | LoopguardReply | AdminReply


@dataclass(frozen=True)
class Service:
    """A service the operator commands ask: who it is and what to check when nobody
    answers (`who`, `check`), its reply model, the reason for nobody answering, and how
    long to wait by default."""

    who: str
    check: str
    reply: type[Reply]
    unavailable: Reason
    timeout: float

    async def ask(
        self, nc: NATS, subject: str, body: BaseModel, timeout: float | None = None
    ) -> Any:
        """The reply's result. A refusal raises CallerError with the service's reason;
        nobody answering raises TransientError(`unavailable`) naming who should have and
        what to check."""
        try:
            msg = await nc.request(
                subject, body.model_dump_json().encode(), timeout=timeout or self.timeout
            )
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            raise TransientError(
                f"no {self.who} answered {subject}: {self.check}", self.unavailable
            ) from exc
        answer = self.reply.model_validate_json(msg.data)
        if not answer.ok:
            raise refusal(answer.error, answer.reason)
        return answer.result


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, the first row the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
