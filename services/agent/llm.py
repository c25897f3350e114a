"""The agent's side of the Membrane: an LLM call is a NATS request to the gateway."""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from beamline import bus, subjects
from beamline.config import ModelChoice
from beamline.envelope import (
    ChatMessage,
    Envelope,
    ErrorPayload,
    LLMRequestPayload,
    LLMResponsePayload,
    ToolSpec,
)
from beamline.errors import CallerError, Reason, TransientError

# Reasons the gateway reports that are worth retrying later rather than failing the task.
_TRANSIENT = {
    Reason.PROVIDER_TIMEOUT,
    Reason.PROVIDER_ERROR,
    Reason.PROVIDER_UNAVAILABLE,
    Reason.RATE_LIMITED,
    Reason.PROVIDER_BAD_RESPONSE,
    Reason.BUDGET_UNAVAILABLE,  # the budget service is down: no call was made, try later
    Reason.BUDGET_HELD,  # calls in flight hold the budget: it fits once they settle
}
_REPLY_MAX_BYTES = 4 * 1024 * 1024


class CircuitOpen(TransientError):
    """The provider's breaker is open: the gateway refused the call (or the call's failure
    tripped it). Not a retry to burn: the agent fails over or pauses."""

    reason = Reason.CIRCUIT_OPEN


def request(
    task: Envelope,
    agent: str,
    step: int,
    request_id: str,
    choice: ModelChoice,
    messages: tuple[ChatMessage, ...],
    max_tokens: int,
    tools: tuple[ToolSpec, ...] = (),
    json_output: bool = False,
) -> Envelope:
    """One LLM call of `task`'s, to `choice`. The same request id whichever provider serves
    it: the step is one LLM call, and the gateway's result store answers a repeat of an
    answered one."""
    return task.child(
        LLMRequestPayload(
            provider=choice.provider,
            model=choice.model,
            messages=messages,
            tools=tools,
            max_tokens=max_tokens,
            json_output=json_output,
        ),
        id=request_id,
        sender=agent,
        recipient=f"gateway.{choice.provider}",
        step=step,
    )


async def call(nc: NATS, request: Envelope, timeout: float) -> Envelope:
    """Send one LLM request; return the `llm_response` envelope or raise a classified error."""
    provider = getattr(request.payload, "provider", "")
    try:
        msg = await nc.request(
            subjects.llm(provider),
            bus.encode(request),
            timeout=timeout,
            headers=bus.headers_for(request),
        )
    except NoRespondersError as exc:
        raise TransientError(
            "no LLM gateway is answering on bl.llm.*: start the gateway service",
            Reason.GATEWAY_UNAVAILABLE,
        ) from exc
    except NatsTimeout as exc:
        raise TransientError(
            f"the gateway did not answer within {timeout:.0f}s", Reason.GATEWAY_UNAVAILABLE
        ) from exc
    reply = bus.decode(msg.data, _REPLY_MAX_BYTES)
    if isinstance(reply.payload, LLMResponsePayload):
        return reply
    if isinstance(reply.payload, ErrorPayload):
        reason = _reason(reply.payload.reason)
        if reason is Reason.CIRCUIT_OPEN:
            raise CircuitOpen(reply.payload.message)
        if reason in _TRANSIENT:
            raise TransientError(reply.payload.message, reason)
        raise CallerError(reply.payload.message, reason or Reason.PROVIDER_ERROR)
    raise TransientError(
        f"the gateway answered a {reply.kind.value} envelope", Reason.PROVIDER_BAD_RESPONSE
    )


def _reason(value: str) -> Reason | None:
    try:
        return Reason(value)
    except ValueError:
        return None
