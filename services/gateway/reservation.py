"""Budget reservations: before a provider call, ask the budget service to hold its estimate.

Only calls by an agent with a budget somewhere on its chain (its own, or an ancestor
supervisor's) are reserved; a deployment without budgets never needs the budget service.
When it is needed and does not answer, the call is not made: the requester gets
`budget_unavailable` (a transient reason, so the agent retries with backoff) instead of
spending without a limit.
"""

from __future__ import annotations

import logging

import nats.errors
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from beamline import subjects
from beamline.budget import BudgetReply, ReserveRequest, estimate_input_tokens
from beamline.config import Deployment
from beamline.envelope import Envelope, LLMRequestPayload
from beamline.errors import Reason
from beamline.log import ctx
from services.gateway import replies
from services.gateway.replies import Reply

log = logging.getLogger("services.gateway")


class Reservations:
    def __init__(self, nc: NATS, deployment: Deployment, timeout_s: float) -> None:
        self._nc, self._timeout_s = nc, timeout_s
        self.budgeted = deployment.budgeted
        self.refused = 0

    async def reserve(self, request: Envelope, payload: LLMRequestPayload) -> Reply | None:
        """None when the call may go ahead; else the error reply to send instead."""
        if not self.budgeted(request.sender):
            return None
        body = ReserveRequest(
            request_id=request.id,
            agent=request.sender,
            provider=payload.provider,
            model=payload.model,
            input_tokens=estimate_input_tokens(payload),
            output_tokens=payload.max_tokens,
            conversation_id=request.conversation_id,
            trace_id=request.trace_id,
        )
        try:
            msg = await self._nc.request(
                subjects.BUDGET_RESERVE, body.model_dump_json().encode(), timeout=self._timeout_s
            )
            answer = BudgetReply.model_validate_json(msg.data)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, ValidationError) as exc:
            why = (
                f"no budget service answered {subjects.BUDGET_RESERVE} within "
                f"{self._timeout_s:g}s ({type(exc).__name__}); the call was not made, since "
                f"{request.sender}'s budget is enforced: start services/budget"
            )
            log.warning("budget unavailable; call not made", extra=ctx(request, error=why))
            return self._refuse(request, Reason.BUDGET_UNAVAILABLE, why)
        if answer.ok:
            return None
        if answer.reason in (Reason.BUDGET_EXHAUSTED, Reason.BUDGET_HELD):
            log.info("reservation refused; call not made", extra=ctx(request, error=answer.error))
            return self._refuse(request, Reason(answer.reason), answer.error or "")
        # it could not persist the hold, or rejected our own request (a bug here): either
        # way the agent is not at fault, and the call is not made
        why = f"the budget service did not grant the reservation: {answer.reason}: {answer.error}"
        log.error("reservation rejected", extra=ctx(request, error=why))
        return self._refuse(request, Reason.BUDGET_UNAVAILABLE, why)

    def _refuse(self, request: Envelope, reason: Reason, why: str) -> Reply:
        self.refused += 1
        return Reply.of(replies.error(request, reason, why))
