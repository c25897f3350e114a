"""What an agent does under context pressure: the I/O of conversation.py's `Summarise` and
`ResetWindow` (the decisions, and what a window keeps, are pure: conversation.py, window.py).

- Summarise: one LLM call, routed like any call (failover, pause, the gateway's breakers and
  result store: its request id is deterministic, so a respawned agent is answered from the
  store instead of paying twice), retried on transient failures like a step. Its answer is
  journaled as a `summary` entry that stands in for the older turns from then on.
- When that call fails for good, or answers nothing: a fresh window instead.
- ResetWindow: the fresh window's seed is journaled; a supervised agent's incarnation then
  ends with exit `context_overflow` and its supervisor restarts it under its strategy (the
  next incarnation starts from the fresh window); an unsupervised agent goes straight on.

Each is an event (`bl.events.agent.context_summarised` / `context_window_reset`), caused
by the task so it sits in its trace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nats.errors import Error as NatsError

from beamline import log as logctx
from beamline.config import AgentSpec, ModelChoice
from beamline.envelope import (
    Envelope,
    Kind,
    LLMResponsePayload,
    SummaryPayload,
)
from beamline.errors import CallerError, Reason, TransientError
from beamline.events import event_envelope
from beamline.ids import derived_id
from services.agent import conversation as conv
from services.agent import llm

if TYPE_CHECKING:
    from services.agent.runner import ExitReport, HostContext

log = logging.getLogger("beamline.agent")


class WindowReset(Exception):
    """A supervised agent's context window was reset (its fresh window is journaled): the
    incarnation ends with exit `context_overflow` (not a crash), and its supervisor restarts
    it under its strategy; the next incarnation starts from the fresh window."""

    def __init__(self) -> None:
        super().__init__(Reason.CONTEXT_OVERFLOW.value)


class WindowKeeper:
    """Context pressure, as a part of `Agent` (a mixin, like `StateClock`: empty slots, so
    a host's many agents stay dict-free). What it uses of the agent is declared here and
    provided by `Agent`."""

    __slots__ = ()
    spec: AgentSpec
    ctx: HostContext
    name: str
    step: int
    last_error: str | None
    on_exit: ExitReport | None

    async def _send(
        self,
        task: Envelope,
        build: Callable[[ModelChoice], Envelope],
        fits: Callable[[ModelChoice], bool] | None = None,
    ) -> Envelope | None:
        raise NotImplementedError

    def _llm_entry(
        self, task: Envelope, response: Envelope, entry_id: str, **update: Any
    ) -> Envelope:
        raise NotImplementedError

    def _count(self, response: Envelope) -> None:
        raise NotImplementedError

    def _retry_delay(self, attempt: int) -> float:
        raise NotImplementedError

    async def _summarise(
        self, spec: AgentSpec, task: Envelope, journal: list[Envelope], action: conv.Summarise
    ) -> None:
        response = await self._summary_call(task, action)
        payload = response.payload if response is not None else None
        summary = (
            conv.summarised(spec, journal, action, payload)
            if isinstance(payload, LLMResponsePayload)
            else None
        )
        if response is None or summary is None:
            fresh = conv.reset_window(
                spec, journal, task.id, self.name, action.limits, action.tokens_before
            )
            if isinstance(fresh, conv.Fail):
                raise CallerError(fresh.message, fresh.reason)
            await self._reset_window(task, fresh)
            return
        self._count(response)
        entry = self._llm_entry(task, response, action.entry_id, kind=Kind.SUMMARY, payload=summary)
        await self.ctx.journal.append(self.name, entry)
        log.info(
            "context summarised",
            extra=logctx.ctx(
                entry,
                agent=self.name,
                tokens_before=summary.tokens_before,
                tokens_after=summary.tokens_after,
            ),
        )
        self._context_event(entry, "context_summarised", summarised_through=summary.through)

    async def _summary_call(self, task: Envelope, action: conv.Summarise) -> Envelope | None:
        """The summarisation call's `llm_response`, or None once it has failed for good: a
        refusal at once, a transient failure after the agent's usual retries."""
        attempts = 0
        while True:
            try:
                return await self._send(
                    task, lambda choice: self._summary_request(task, action, choice)
                )
            except (TransientError, NatsError, TimeoutError) as exc:
                attempts += 1
                # Agent's slot (mypy sees only this class's empty __slots__, as in StateClock)
                self.last_error = f"summarising: {exc!r}"  # type: ignore[misc]
                if attempts > self.ctx.settings.transient_retries:
                    log.warning(
                        "summarisation failed; resetting the context window",
                        extra=logctx.ctx(task, agent=self.name, error=str(exc), attempts=attempts),
                    )
                    return None
                await asyncio.sleep(self._retry_delay(attempts))
            except CallerError as exc:
                self.last_error = f"summarising: {exc!r}"  # type: ignore[misc]
                log.warning(
                    "summarisation refused; resetting the context window",
                    extra=logctx.ctx(task, agent=self.name, error=str(exc)),
                )
                return None

    def _summary_request(
        self, task: Envelope, action: conv.Summarise, choice: ModelChoice
    ) -> Envelope:
        return llm.request(
            task,
            self.name,
            self.step,
            action.request_id,
            choice,
            action.messages,
            action.max_tokens,
        )

    async def _reset_window(self, task: Envelope, action: conv.ResetWindow) -> None:
        """Journal the fresh window; then a supervised incarnation ends (`WindowReset`)."""
        entry = task.child(
            action.summary,
            id=action.entry_id,
            sender=self.name,
            recipient=self.name,
            step=self.step,
        )
        await self.ctx.journal.append(self.name, entry)
        supervised = self.on_exit is not None
        log.warning(
            "context window reset" + ("; restarting" if supervised else ""),
            extra=logctx.ctx(entry, agent=self.name, tokens_after=action.summary.tokens_after),
        )
        self._context_event(
            entry,
            "context_window_reset",
            seed="summary" if action.from_summary else "turns",
            restart=supervised,
        )
        if supervised:
            raise WindowReset

    def _context_event(self, entry: Envelope, name: str, **extra: object) -> None:
        """The event for a journaled summary or fresh window; its id derives from the
        entry's, so a respawn that repeats it records it once."""
        summary = entry.payload
        if self.ctx.events is None or not isinstance(summary, SummaryPayload):
            return
        data = {
            "agent": self.name,
            "conversation": entry.conversation_id,
            "tokens_before": summary.tokens_before,
            "tokens_after": summary.tokens_after,
            "window": summary.window,
            "threshold": summary.threshold,
            **extra,
        }
        event = event_envelope(self.ctx.events.source, name, data, entry)
        self.ctx.events.emit_envelope(event.model_copy(update={"id": derived_id(name, entry.id)}))
