"""One provider behind the gateway: its HTTP client, breaker and retry loop.

`complete()` never raises for anything the provider does: every outcome, including an open
breaker and a blown deadline, comes back as a `CallResult` the shell turns into a reply.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from beamline.circuit import Circuit
from beamline.config import Provider
from beamline.envelope import LLMRequestPayload
from beamline.errors import Reason
from beamline.subjects import H_TRACEPARENT
from services.gateway import retry
from services.gateway.breaker import BreakerOpen, ProviderBreaker, ProviderFailure
from services.gateway.http_pool import ClientPool
from services.gateway.providers import BadResponse, Completion, HttpRequest, WireFormat, error_text
from services.gateway.redaction import Redactor

# An attempt with less time than this left would only fail and count against the breaker.
MIN_ATTEMPT_S = 0.05


@dataclass(frozen=True)
class Backoff:
    base_s: float
    cap_s: float
    retry_after_cap_s: float


@dataclass(frozen=True)
class CallResult:
    completion: Completion | None
    reason: Reason | None  # set when completion is None
    error: str | None  # scrubbed, for the caller
    attempts: int  # HTTP requests actually sent
    latency_ms: float
    status: int | None = None  # the last HTTP status seen
    # the breaker is open now (this call was refused, or its failure tripped it): callers
    # should fail over or pause instead of retrying this provider
    circuit_open: bool = False


@dataclass
class Counters:
    ok: int = 0
    failed: int = 0
    refused: int = 0
    throttled: int = 0  # requests that waited out a 429's Retry-After before sending
    http_attempts: int = 0
    last_error: str | None = None


class Upstream:
    def __init__(
        self,
        name: str,
        config: Provider,
        wire: WireFormat,
        breaker: ProviderBreaker,
        *,
        api_key: str | None,
        backoff: Backoff,
        redactor: Redactor,
        max_connections: int,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.breaker = breaker
        self.counters = Counters()
        self._wire = wire
        self._api_key = api_key
        self._backoff = backoff
        self._redactor = redactor
        self._rng = rng or random.Random()
        # time.monotonic() before which no request goes to this provider: a 429's
        # Retry-After throttles the provider, not only the request that got it
        self.throttled_until = 0.0
        # pool=None: the gateway's own concurrency bound caps connections; waiting for a
        # pooled connection is not the provider's fault and must not look like a timeout.
        self._pool = ClientPool(
            max_connections,
            base_url=config.base_url.rstrip("/"),
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s, pool=None),
            transport=transport,
        )

    @property
    def missing_key(self) -> bool:
        return bool(self.config.api_key_env) and not self._api_key

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def complete(
        self, request: LLMRequestPayload, traceparent: str | None, deadline: float
    ) -> CallResult:
        """Call the provider with retries until success, a final failure or `deadline`
        (a `time.monotonic()` value)."""
        started = time.monotonic()
        http = self._wire.build(request, self._api_key)
        if traceparent:
            http.headers[H_TRACEPARENT] = traceparent
        last: ProviderFailure | None = None
        attempts = 0
        for attempt in range(1, self.config.max_attempts + 1):
            if deadline - time.monotonic() < MIN_ATTEMPT_S:
                break
            if not await self._throttle(deadline):
                last = last or ProviderFailure(
                    retry.RATE_LIMITED,
                    "rate limited: the provider's Retry-After outlasts the deadline",
                )
                break
            try:
                with self.breaker.guard():
                    attempts += 1
                    outcome = await self._attempt(http, request, deadline)
                    if isinstance(outcome, ProviderFailure) and outcome.verdict.breaker_failure:
                        raise outcome
            except BreakerOpen as exc:
                if last is None:
                    return self._refused(str(exc), started)
                last = ProviderFailure(last.verdict, f"{last}; circuit now open", None, last.status)
                break
            except ProviderFailure as failure:
                outcome = failure
            if isinstance(outcome, Completion):
                return self._succeeded(outcome, attempts, started)
            last = outcome
            if outcome.verdict is retry.RATE_LIMITED:
                self.throttled_until = retry.throttle_until(
                    self.throttled_until,
                    time.monotonic(),
                    outcome.retry_after,
                    self._backoff.retry_after_cap_s,
                )
            if not outcome.verdict.retry or attempt == self.config.max_attempts:
                break
            delay = retry.backoff_delay(
                attempt,
                outcome.retry_after,
                base=self._backoff.base_s,
                cap=self._backoff.cap_s,
                retry_after_cap=self._backoff.retry_after_cap_s,
                rng=self._rng,
            )
            if time.monotonic() + delay + MIN_ATTEMPT_S > deadline:
                break  # answering now beats answering after the requester gave up
            await asyncio.sleep(delay)
        return self._failed(last, attempts, started)

    async def _throttle(self, deadline: float) -> bool:
        """Wait out a throttle in force (a 429's Retry-After); False when it outlasts the
        deadline: answering `rate_limited` now beats answering it after the requester left."""
        wait = self.throttled_until - time.monotonic()
        if wait <= 0:
            return True
        if time.monotonic() + wait + MIN_ATTEMPT_S > deadline:
            return False
        self.counters.throttled += 1
        await asyncio.sleep(wait)
        return True

    async def _attempt(
        self, http: HttpRequest, request: LLMRequestPayload, deadline: float
    ) -> Completion | ProviderFailure:
        """One HTTP request. Returns (rather than raises) failures so the caller decides
        which of them the breaker sees."""
        remaining = deadline - time.monotonic()
        read = min(self.config.timeout_s, remaining)
        connect = min(self.config.connect_timeout_s, remaining)
        timeout = httpx.Timeout(read, connect=connect, pool=None)
        # httpx's timeouts are per socket operation; this bounds the whole attempt too, so
        # a provider trickling bytes cannot outlive the attempt (or the request's deadline).
        bound = min(remaining, self.config.connect_timeout_s + self.config.timeout_s)
        try:
            async with asyncio.timeout(bound), self._pool.client() as client:
                resp = await client.post(
                    http.path, json=http.body, headers=http.headers, timeout=timeout
                )
        except httpx.ConnectTimeout:
            return ProviderFailure(
                retry.TIMEOUT, f"connect timeout: no connection in {connect:.1f}s"
            )
        except (TimeoutError, httpx.TimeoutException):
            return ProviderFailure(retry.TIMEOUT, f"read timeout: no answer within {read:.1f}s")
        except httpx.TransportError as exc:
            return ProviderFailure(retry.CONNECTION, self._redactor.describe(exc))
        verdict = retry.classify_status(resp.status_code)
        if verdict is not None:
            return self._http_failure(resp, verdict)
        try:
            body = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return ProviderFailure(
                retry.BAD_RESPONSE,
                f"HTTP {resp.status_code} body is not JSON: {self._redactor.describe(exc)}",
            )
        try:
            return self._wire.parse(body, request)
        except (BadResponse, ValueError) as exc:
            # ValueError: pydantic rejecting what the provider sent (e.g. an odd role)
            return ProviderFailure(
                retry.BAD_RESPONSE,
                f"unexpected response shape: {self._redactor.scrub(str(exc), 300)}",
            )

    def _http_failure(self, resp: httpx.Response, verdict: retry.Verdict) -> ProviderFailure:
        raw = resp.text
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        text = self._redactor.scrub(error_text(body, raw), 300)
        if resp.status_code in (401, 403) and self.missing_key:
            text += f" (the gateway has no key: {self.config.api_key_env} is not set)"
        after = retry.parse_retry_after(resp.headers.get("retry-after"), datetime.now(UTC))
        return ProviderFailure(verdict, f"HTTP {resp.status_code}: {text}", after, resp.status_code)

    def _succeeded(self, completion: Completion, attempts: int, started: float) -> CallResult:
        self.counters.ok += 1
        self.counters.http_attempts += attempts
        return CallResult(completion, None, None, attempts, _ms_since(started), 200)

    def refusal(self) -> CallResult | None:
        """The `circuit_open` result a call would get now without being made, or None."""
        why = self.breaker.refusal()
        return None if why is None else self._refused(why, time.monotonic())

    def _failed(self, last: ProviderFailure | None, attempts: int, started: float) -> CallResult:
        self.counters.failed += 1
        self.counters.http_attempts += attempts
        if last is None:  # the deadline left no time for even one attempt
            last = ProviderFailure(retry.TIMEOUT, "the gateway deadline passed before a call")
        message = self._redactor.scrub(
            f"provider {self.name!r}: {last} (after {attempts} attempt{'s' * (attempts != 1)})"
        )
        self.counters.last_error = message
        return CallResult(
            None,
            last.verdict.reason,
            message,
            attempts,
            _ms_since(started),
            last.status,
            circuit_open=self.breaker.circuit is Circuit.OPEN,
        )

    def _refused(self, message: str, started: float) -> CallResult:
        self.counters.refused += 1
        text = self._redactor.scrub(message)
        self.counters.last_error = text
        return CallResult(None, Reason.CIRCUIT_OPEN, text, 0, _ms_since(started), circuit_open=True)


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)
