"""The gateway's NATS shell: requests on `bl.llm.<provider>` in, one reply per request out.

Raw nats-py, not FastStream: the gateway needs the raw bytes (to answer `not_json` itself),
the headers (traceparent), `msg.reply`, its own concurrency bound and the same connection
for health, KV and events. FastStream's decoding layer would be bypassed for all of that,
and it would open a second connection.

nats-py runs one subscription's callbacks one after another, so the callback only takes a
slot (waiting there is the backpressure when `concurrency` requests are in flight) and
hands the request to a task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from beamline import bus, subjects
from beamline.config import Deployment
from beamline.envelope import Envelope, LLMRequestPayload
from beamline.errors import CallerError, ConfigError, Reason
from beamline.events import EventSink
from beamline.log import ctx
from beamline.service import answer_health, crash_on_error
from beamline.settings import MeshSettings
from services.gateway import replies
from services.gateway.board import BreakerBoard
from services.gateway.breaker import ProviderBreaker
from services.gateway.idempotency import ResultStore, Singleflight
from services.gateway.providers import wire_for
from services.gateway.redaction import Redactor
from services.gateway.replies import Reply
from services.gateway.reservation import Reservations
from services.gateway.settings import GatewaySettings
from services.gateway.upstream import MIN_ATTEMPT_S, Backoff, CallResult, Upstream

log = logging.getLogger("services.gateway")
SERVICE = "gateway"
DRAIN_TIMEOUT_S = 2.0
# How often open breakers are checked for their reset timeout: a breaker half-opens at most
# this late (a quarter of the shortest reset timeout, within these bounds).
CLOCK_MIN_S, CLOCK_MAX_S = 0.05, 1.0


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        mesh: MeshSettings,
        deployment: Deployment,
        nc: NATS,
        kv: KeyValue,
        breakers_kv: KeyValue,
    ) -> None:
        if not deployment.providers:
            raise ConfigError(f"{mesh.config}: providers: none declared; the gateway has no work")
        self._settings = settings
        self._mesh = mesh
        self._nc = nc
        self._events = EventSink(nc.jetstream(), "gateway")
        self._results = ResultStore(kv)
        self._flight: Singleflight[Reply] = Singleflight()
        self._budget = Reservations(nc, deployment, settings.budget_timeout_s)
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Subscription] = []
        self._clock: asyncio.Task[None] | None = None
        self.id = f"{socket.gethostname()}-{os.getpid()}"
        self._board = BreakerBoard(breakers_kv, self.id)
        self.redactor = Redactor()
        self.upstreams = {
            name: self._upstream(name, deployment) for name in sorted(deployment.providers)
        }
        self.counts = {
            "requests": 0,
            "replied_ok": 0,
            "replied_error": 0,
            "cached": 0,
            "dead_lettered": 0,
        }
        self.last_error: str | None = None

    def _upstream(self, name: str, deployment: Deployment) -> Upstream:
        cfg = deployment.providers[name]
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.redactor.add(key)
        if cfg.api_key_env and not key:
            # not fatal: keyless OpenAI-compatible servers (fakellm, a local vLLM) are common,
            # and a real provider's 401 names the problem (the reply adds the variable)
            log.warning(
                "provider API key variable is not set; calling without a key",
                extra={"provider": name, "api_key_env": cfg.api_key_env},
            )
        breaker = ProviderBreaker(
            name, cfg.breaker_fail_max, cfg.breaker_reset_s, self._breaker_event
        )
        backoff = Backoff(
            self._settings.backoff_base_s,
            self._settings.backoff_cap_s,
            self._settings.retry_after_cap_s,
        )
        return Upstream(
            name,
            cfg,
            wire_for(cfg.kind),
            breaker,
            api_key=key,
            backoff=backoff,
            redactor=self.redactor,
            max_connections=self._settings.concurrency,
        )

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._events.start()
        # this gateway's breakers start closed: say so, replacing what a previous gateway
        # instance (perhaps one that died with a breaker open) left in the bucket
        for upstream in self.upstreams.values():
            self._board.put(upstream.breaker.record)
        self._board.start()
        self._clock = asyncio.create_task(self._breaker_clock(), name="gateway-breaker-clock")
        self._clock.add_done_callback(crash_on_error)
        self._subs.append(
            await self._nc.subscribe(
                subjects.LLM_ALL, queue=subjects.QUEUE_GATEWAY, cb=self._on_message
            )
        )
        self._subs.append(await answer_health(self._nc, SERVICE, self.status))
        log.info(
            "serving",
            extra={"subject": subjects.LLM_ALL, "providers": sorted(self.upstreams)},
        )

    async def stop(self) -> None:
        """Stop taking requests, finish the in-flight ones, then close the clients."""
        for sub in self._subs:
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    await sub.drain()  # type: ignore[no-untyped-call]
            except Exception as exc:  # NATS down or closed: nothing more will arrive anyway
                log.warning("unsubscribe failed", extra={"error": repr(exc)})
        if self._tasks:
            log.info("finishing in-flight requests", extra={"in_flight": len(self._tasks)})
            _, pending = await asyncio.wait(self._tasks, timeout=self._settings.stop_grace_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("in-flight requests abandoned", extra={"count": len(pending)})
        if self._clock is not None:
            self._clock.cancel()
        await self._events.close(timeout=5.0)
        await self._board.close(timeout=2.0)
        for upstream in self.upstreams.values():
            await upstream.aclose()

    def status(self) -> dict[str, Any]:
        return {
            "in_flight": len(self._tasks),
            "concurrency": self._settings.concurrency,
            "shared_duplicates": self._flight.shared,
            "events_published": self._events.published,
            "events_dropped": self._events.dropped,
            "breaker_states_written": self._board.written,
            "breaker_state_write_failures": self._board.failed,
            "last_error": self.last_error,
            "budget_refused": self._budget.refused,
            **self.counts,
            "providers": {
                name: {
                    "kind": up.config.kind,
                    "breaker": up.breaker.state,
                    "consecutive_failures": up.breaker.fail_count,
                    "calls_ok": up.counters.ok,
                    "calls_failed": up.counters.failed,
                    "refused": up.counters.refused,
                    "throttled": up.counters.throttled,
                    "throttled_for_s": round(max(0.0, up.throttled_until - time.monotonic()), 3),
                    "http_attempts": up.counters.http_attempts,
                    "api_key": "missing" if up.missing_key else "ok",
                    "last_error": up.counters.last_error,
                }
                for name, up in self.upstreams.items()
            },
        }

    # --- requests -------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        deadline = time.monotonic() + self._settings.deadline_s
        await self._slots.acquire()
        task = asyncio.create_task(self._handle(msg, deadline))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _handle(self, msg: Msg, deadline: float) -> None:
        self.counts["requests"] += 1
        try:
            reply = await self._process(msg, deadline)
        except Exception as exc:
            # a bug: keep its traceback, but still answer so the requester is not left hanging
            log.exception("request handling failed", extra={"subject": msg.subject})
            why = f"gateway internal error: {self.redactor.describe(exc)}"
            reply = Reply.of(replies.error(None, Reason.PROVIDER_ERROR, why, msg.data))
        if reply is None or not msg.reply:
            return
        self.counts["replied_ok" if reply.ok else "replied_error"] += 1
        try:
            await self._nc.publish(msg.reply, reply.data, headers=reply.headers)
        except Exception as exc:
            log.warning("reply not sent", extra=ctx(reply.envelope, error=repr(exc)))

    async def _process(self, msg: Msg, deadline: float) -> Reply | None:
        """The reply to send, or None when the message was dead-lettered instead."""
        provider = msg.subject.rsplit(".", 1)[-1]
        header_tp = (msg.headers or {}).get(subjects.H_TRACEPARENT)
        try:
            request = bus.decode(msg.data, self._mesh.max_message_bytes)
        except CallerError as exc:
            return await self._reject(msg, None, exc.reason, exc.message, header_tp)
        payload = request.payload
        if not isinstance(payload, LLMRequestPayload):
            why = f"expected an llm_request envelope, got {request.kind.value!r}"
            return await self._reject(msg, request, Reason.INVALID_SCHEMA, why, header_tp)
        upstream = self.upstreams.get(provider)
        if upstream is None:
            why = f"no provider {provider!r} on this gateway (declared: {sorted(self.upstreams)})"
            return await self._reject(msg, request, Reason.UNKNOWN_PROVIDER, why, header_tp)
        if payload.provider != provider:
            why = f"payload.provider {payload.provider!r} does not match subject {msg.subject!r}"
            return await self._reject(msg, request, Reason.INVALID_SCHEMA, why, header_tp)
        if not msg.reply:
            why = "no reply subject: send LLM requests with NATS request/reply"
            return await self._reject(msg, request, Reason.INVALID_SCHEMA, why, header_tp)
        traceparent = bus.traceparent(request)
        if header_tp and bus.parse_traceparent(header_tp):
            traceparent = header_tp  # the caller's own trace context wins

        async def answer() -> Reply:
            return await self._answer(request, payload, upstream, traceparent, deadline)

        return await self._flight.do(request.id, answer)

    async def _answer(
        self,
        request: Envelope,
        payload: LLMRequestPayload,
        upstream: Upstream,
        traceparent: str,
        deadline: float,
    ) -> Reply:
        stored = await self._stored(request)
        if stored is not None:
            return stored
        waited = self._settings.deadline_s - (deadline - time.monotonic())
        if deadline - time.monotonic() < MIN_ATTEMPT_S:
            # every slot was busy for the whole deadline: say so instead of blaming the provider
            why = (
                f"gateway saturated: waited {waited:.1f}s for one of "
                f"{self._settings.concurrency} slots (BEAMLINE_GATEWAY_CONCURRENCY)"
            )
            self.last_error = why
            return Reply.of(replies.error(request, Reason.GATEWAY_UNAVAILABLE, why))
        # an open breaker first: its refusal costs no reservation, and tells a paused agent
        # circuit_open (keep waiting) even when the budget service is down too
        result = upstream.refusal()
        if result is None:
            refusal = await self._budget.reserve(request, payload)
            if refusal is not None:  # over budget, or the budget unknown: no provider call
                return refusal
            result = await upstream.complete(payload, traceparent, deadline)
        self._call_event(request, payload, result)
        if result.completion is None:
            reason = result.reason or Reason.PROVIDER_ERROR
            self.last_error = error = result.error or f"provider {upstream.name!r} failed"
            log.warning(
                "llm call failed",
                extra=ctx(request, reason=reason.value, error=error, attempts=result.attempts),
            )
            if result.circuit_open:
                # the cause stays in the message (and the event); the reason tells the agent
                # to fail over or pause rather than retry a provider that is now refused
                reason = Reason.CIRCUIT_OPEN
            return Reply.of(replies.error(request, reason, error))
        reply = Reply.of(
            replies.response(
                request, payload, result.completion, result.latency_ms, result.attempts
            )
        )
        # stored before it is sent: a requester that crashes right after still finds it
        await self._results.put(request.id, reply.data)
        log.info(
            "llm call completed",
            extra=ctx(
                request,
                provider=upstream.name,
                attempts=result.attempts,
                latency_ms=result.latency_ms,
            ),
        )
        return reply

    async def _stored(self, request: Envelope) -> Reply | None:
        data = await self._results.get(request.id)
        if data is None:
            return None
        try:
            reply = Reply.stored(data)
        except ValueError as exc:  # not ours or from an older schema: call again
            log.warning("stored result unreadable; calling", extra=ctx(request, error=repr(exc)))
            return None
        self.counts["cached"] += 1
        log.info("answered from stored result", extra=ctx(request))
        return reply

    async def _reject(
        self,
        msg: Msg,
        request: Envelope | None,
        reason: Reason,
        message: str,
        traceparent: str | None,
    ) -> Reply | None:
        """Caller's fault: an error reply, or a dead letter when nobody awaits a reply."""
        message = self.redactor.scrub(message)
        self.last_error = message
        log.info("request rejected", extra=ctx(request, reason=reason.value, error=message))
        if msg.reply:
            return Reply.of(replies.error(request, reason, message, msg.data, traceparent))
        letter = replies.dead_letter(request, reason, message, msg.subject, msg.data, traceparent)
        try:
            await bus.publish(self._nc.jetstream(), subjects.dlq(SERVICE), letter)
            self.counts["dead_lettered"] += 1
        except Exception as exc:
            log.warning("dead letter not published", extra=ctx(letter, error=repr(exc)))
        return None

    # --- events ---------------------------------------------------------------------

    def _breaker_event(self, name: str, data: dict[str, Any]) -> None:
        log.warning("circuit breaker changed", extra={"event": name, **data})
        self._events.emit(name, data)
        upstream = self.upstreams.get(data["provider"])  # transitions come only from calls
        if upstream is not None:
            self._board.put(upstream.breaker.record)

    async def _breaker_clock(self) -> None:
        """Half-open each open breaker once its reset timeout has passed (breaker.py says
        why the gateway does this itself)."""
        shortest = min(up.breaker.reset_s for up in self.upstreams.values())
        tick = min(CLOCK_MAX_S, max(CLOCK_MIN_S, shortest / 4))
        while True:
            await asyncio.sleep(tick)
            for upstream in self.upstreams.values():
                upstream.breaker.half_open_if_due()

    def _call_event(
        self, request: Envelope, payload: LLMRequestPayload, result: CallResult
    ) -> None:
        data: dict[str, Any] = {
            "provider": payload.provider,
            "model": payload.model,
            "request_id": request.id,
            "agent": request.sender,  # whose budget the call is charged to
            "attempts": result.attempts,
            "latency_ms": result.latency_ms,
            "http_status": result.status,
        }
        if result.completion is not None:
            usage = result.completion.usage
            data.update(
                status="ok",
                finish_reason=result.completion.finish_reason,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
            )
            self._events.emit("llm_call_completed", data, request)
        else:
            data.update(
                status="error",
                reason=str(result.reason),
                error=result.error,
                circuit_open=result.circuit_open,
            )
            self._events.emit("llm_call_failed", data, request)
