"""One small exception tree. Every failure carries a stable reason code that travels in
error replies (`ErrorPayload.reason`) and dead-letter headers (`Bl-Reason`).

Classification decides what a service does next:
- CallerError: the sender's fault; answer with an error or dead-letter it, never retry.
- TransientError: the world's fault; retry later with backoff (nak with delay).
- anything else is a bug: log with traceback and let the process crash.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # the caller's fault
    NOT_JSON = "not_json"
    INVALID_SCHEMA = "invalid_schema"
    OVERSIZED = "oversized"
    UNKNOWN_RECIPIENT = "unknown_recipient"
    UNKNOWN_ROLE = "unknown_role"
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_TOOL_ARGUMENTS = "invalid_tool_arguments"
    UNKNOWN_PROVIDER = "unknown_provider"
    INVALID_LLM_OUTPUT = "invalid_llm_output"
    QUERY_REJECTED = "query_rejected"
    MAX_STEPS = "max_steps_exceeded"
    TOOL_FAILED = "tool_failed"
    BUDGET_EXHAUSTED = "budget_exhausted"  # a reservation refused: the subtree is stopped
    # a conversation that does not fit its model's context window even when reset to a
    # fresh window (the task fails); also the exit of an agent whose window is reset
    CONTEXT_OVERFLOW = "context_overflow"
    # the world's fault
    PROVIDER_TIMEOUT = "provider_timeout"
    PROVIDER_ERROR = "provider_error"
    # the provider refused the request (a 4xx but 408 and 429): sent again, it fails again
    PROVIDER_REJECTED = "provider_rejected"
    PROVIDER_BAD_RESPONSE = "provider_bad_response"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    CIRCUIT_OPEN = "circuit_open"  # the provider's breaker is open: no call was made (or the
    # failed call tripped it); the caller fails over to another provider or pauses
    RATE_LIMITED = "rate_limited"
    GATEWAY_UNAVAILABLE = "gateway_unavailable"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    NATS_UNAVAILABLE = "nats_unavailable"
    BUDGET_UNAVAILABLE = "budget_unavailable"  # no budget service answered: no call made
    BUDGET_HELD = "budget_held"  # calls in flight hold the rest of the budget: retry shortly
    # delivered too often without success
    POISON = "poison"


class BeamlineError(Exception):
    """Base of every error Beamline raises on purpose."""

    reason: Reason = Reason.INVALID_SCHEMA
    retryable = False

    def __init__(self, message: str, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


class CallerError(BeamlineError):
    """Bad input: reply with the reason or dead-letter it; retrying cannot help."""


def refusal(message: str | None, reason: str | None) -> CallerError:
    """A service's refusal as it came over the wire (message and reason code), raised again
    on this side with the reason kept when it is one of ours."""
    known = {r.value for r in Reason}
    return CallerError(message or "refused", Reason(reason) if reason in known else None)


class TransientError(BeamlineError):
    """A dependency is unavailable for now: retry with backoff."""

    retryable = True
    reason = Reason.PROVIDER_ERROR


class ConfigError(BeamlineError):
    """Configuration that cannot be used; raised at start, before anything runs."""
