"""An agent: one actor with its own ordered queue, driven by its journal.

Idle agents hold no asyncio task, only a small object, so a host can keep very many. A
message is acknowledged only after its outcome (reply or error) is journaled and published.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.client import JetStreamContext

from beamline import bus, subjects
from beamline import log as logctx
from beamline.budget import estimate_tokens
from beamline.config import AgentSpec, ModelChoice
from beamline.control import AgentBeat, StopOutcome
from beamline.control import AgentState as State
from beamline.deadletter import dead_letter
from beamline.envelope import (
    ChatMessage,
    Envelope,
    ErrorPayload,
    ReplyPayload,
    TaskPayload,
    ToolCall,
    ToolResultPayload,
    ToolSpec,
)
from beamline.errors import BeamlineError, CallerError, Reason, TransientError
from beamline.events import EventSink
from beamline.guard import Addendum, with_addendum
from beamline.ids import derived_id
from beamline.tools import Crash, get_tool
from services.agent import conversation as conv
from services.agent import failover, llm
from services.agent.circuits import CircuitView
from services.agent.journal import Journal
from services.agent.pressure import WindowKeeper, WindowReset
from services.agent.settings import AgentHostSettings
from services.agent.window import Limits

log = logging.getLogger("beamline.agent")

MIN_RECHECK_S = 0.05  # a paused agent never re-checks in a tighter loop than this


class Ackable(Protocol):
    async def ack(self) -> None: ...


@dataclass
class Delivery:
    task: Envelope
    msg: Ackable | None = None  # the mailbox message to acknowledge when done
    poison: str | None = None  # why it must not be tried again (delivered too often)
    crashes: int = 0  # incarnations of its agent it has killed on this host


class AgentCrashed(Exception):
    """A supervised agent's code raised: the incarnation dies and its supervisor decides."""


@dataclass
class HostContext:
    nc: NATS
    js: JetStreamContext
    journal: Journal
    settings: AgentHostSettings
    circuits: CircuitView
    events: EventSink | None = None  # routing decisions (paused, resumed, failed over)

    @classmethod
    def open(cls, nc: NATS, settings: AgentHostSettings) -> HostContext:
        """What every process running agents needs, its background writers started: an
        agent host, and an isolated agent's own process."""
        js = nc.jetstream()
        events = EventSink(js, "agent")
        events.start()
        circuits = CircuitView(settings.breaker_recheck_s)
        circuits.start(js)
        return cls(nc, js, Journal(js), settings, circuits, events)

    async def close(self) -> None:
        await self.circuits.close()
        if self.events is not None:
            await self.events.close(timeout=5.0)


ExitReport = Callable[["Agent", str], None]
StateChange = Callable[["Agent"], None]


class StateClock:
    """An agent's state and when it last changed: how long it has made no progress is
    what tells a hung agent. Shared by an agent in a host and an isolated agent's host-side
    stand-in; `_state_changed` is the hook a state change calls."""

    __slots__ = ()
    _state: State
    _changed_at: float

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, value: State) -> None:
        # empty __slots__ here keeps a host's many agents dict-free; the slotted dataclasses
        # deriving from this declare both fields, which mypy cannot see from here
        self._state, self._changed_at = value, time.monotonic()  # type: ignore[misc]
        self._state_changed()

    def _state_changed(self) -> None:
        pass


@dataclass(eq=False, slots=True)
class Agent(StateClock, WindowKeeper):
    """One incarnation of an agent. A supervised agent runs only between its supervisor's
    start and stop; a crash ends the incarnation and the next one (a new object, same
    queue) takes the message up again from the journal. An unsupervised agent always runs.
    Slots, and the spec shared with every member of a pool: a host keeps very many."""

    spec: AgentSpec  # its own, or its pool template's
    ctx: HostContext
    name: str = ""  # the spec's name unless a pool member's
    queue: deque[Delivery] = field(default_factory=deque)
    running: bool = True
    generation: int = 0
    on_exit: ExitReport | None = None  # set for supervised agents: crashes are reported
    on_state: StateChange | None = None  # an isolated agent's process tells its host at once
    processed: int = 0
    failed: int = 0
    tokens: int = 0
    step: int = 0
    last_error: str | None = None
    crashed_at: float | None = None  # monotonic, when this incarnation died
    provider: str | None = None  # where its last LLM call went (None: none yet)
    paused_on: str | None = None  # the provider whose open breaker holds it, while paused
    paused_at: float | None = None  # monotonic, when it paused
    addendum: Addendum | None = None  # the loop guard's, for one conversation (its supervisor's)
    _state: State = State.IDLE
    _changed_at: float = field(default_factory=time.monotonic)
    _worker: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.name = self.name or self.spec.name

    def _state_changed(self) -> None:
        if self.on_state is not None:
            self.on_state(self)

    @property
    def busy(self) -> bool:
        return self._worker is not None and not self._worker.done()

    def deliver(self, delivery: Delivery) -> None:
        self.queue.append(delivery)
        self.kick()

    def kick(self) -> None:
        """Work through the queue if running and not already at it."""
        if self.running and self.queue and not self.busy:
            self._worker = asyncio.create_task(self._drain(), name=f"agent:{self.name}")

    def successor(self, generation: int) -> Agent:
        """The next incarnation: fresh state, the same queue (nothing in it is lost)."""
        return Agent(
            self.spec,
            self.ctx,
            self.name,
            queue=self.queue,
            running=False,
            generation=generation,
            on_exit=self.on_exit,
            processed=self.processed,
            failed=self.failed,
            tokens=self.tokens,
            last_error=self.last_error,
            provider=self.provider,
            _state=State.STARTING,
        )

    def beat(self) -> AgentBeat:
        return AgentBeat(
            agent=self.name,
            state=self.state,
            generation=self.generation,
            mailbox_depth=len(self.queue),
            step=self.step,
            tokens=self.tokens,
            processed=self.processed,
            failed=self.failed,
            progress_age_s=round(time.monotonic() - self._changed_at, 3),
            last_error=self.last_error,
            provider=self._provider_now(),
            paused_on=self.paused_on,
        )

    def _provider_now(self) -> str | None:
        """Where its next call goes: where its calls went, or for an agent that has made
        none, its current route; None while every choice is open."""
        if self.paused_on is not None:
            return None
        if self.provider is not None:
            return self.provider
        route = self.ctx.circuits.route(self.spec.models)
        return route.provider if isinstance(route, failover.Use) else None

    def status(self) -> dict[str, Any]:
        providers = [c.provider for c in self.spec.models]
        breakers = self.ctx.circuits.states(providers)
        return {
            "role": self.spec.role,
            **self.beat().model_dump(),
            "breakers": breakers,
            "isolation": "task",
        }

    async def halt(self, timeout: float | None) -> StopOutcome:
        """Stop working (the supervisor's stop): finish the message in hand within `timeout`
        (None: brutal_kill), else cancel it. Queued messages stay for the next incarnation."""
        self.running = False
        worker = self._worker
        outcome = StopOutcome.SHUTDOWN
        if worker is not None and not worker.done():
            try:
                if self.state is State.PAUSED:
                    # nothing in hand to finish: it only waits for a breaker, and its message
                    # stays unacknowledged for the next incarnation
                    worker.cancel()
                    await asyncio.gather(worker, return_exceptions=True)
                elif timeout is None:
                    raise TimeoutError
                else:
                    await asyncio.wait_for(asyncio.shield(worker), timeout)
            except TimeoutError:
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)
                outcome = StopOutcome.KILLED
        if self.state is not State.DEAD:
            self.state = State.STOPPED
        return outcome

    async def stop(self, timeout: float) -> None:
        """Finish the message in hand (journal, then ack); leave the rest for redelivery."""
        busy = self._worker is not None and not self._worker.done()
        pending = list(self.queue)[1:] if busy else list(self.queue)
        for delivery in pending:
            self.queue.remove(delivery)
        if self._worker and not self._worker.done():
            if self.state is State.PAUSED:  # nothing in hand to finish (see halt)
                timeout = 0
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout)
            except TimeoutError:
                self._worker.cancel()

    async def _drain(self) -> None:
        # A cancelled (killed) incarnation leaves its message at the head of the queue.
        while self.queue and self.running:
            delivery = self.queue[0]
            try:
                await self._handle(delivery)
            except (AgentCrashed, WindowReset) as end:
                self._die(str(end))
                return
            except Exception:  # even the failure path failed (NATS gone): redelivery will retry
                log.exception(
                    "message left unacknowledged for redelivery",
                    extra=logctx.ctx(delivery.task, agent=self.name),
                )
            if self.queue and self.queue[0] is delivery:
                self.queue.popleft()
            self.state = State.IDLE

    def _die(self, exit: str) -> None:
        self.crashed_at = time.monotonic()
        self.running = False
        self.state = State.DEAD
        self.last_error = exit
        if self.on_exit is not None:
            self.on_exit(self, exit)

    async def _handle(self, delivery: Delivery) -> None:
        task = delivery.task
        attempts = 0
        bugs = 0
        if delivery.crashes > self.ctx.settings.bug_retries:
            delivery.poison = f"agent {self.name} crashed on it {delivery.crashes} times"
        while delivery.poison is None:
            try:
                await self._work(task)
                break
            except (TransientError, NatsError, TimeoutError) as exc:
                attempts += 1
                reason = exc.reason if isinstance(exc, TransientError) else Reason.NATS_UNAVAILABLE
                self.last_error = f"{reason.value}: {exc!r}"
                if attempts > self.ctx.settings.transient_retries:
                    await self._fail(task, reason, f"gave up after {attempts} tries: {exc!r}")
                    break
                delay = self._retry_delay(attempts)
                log.warning(
                    "transient failure; retrying",
                    extra=logctx.ctx(
                        task,
                        agent=self.name,
                        reason=reason.value,
                        retry_in_s=round(delay, 2),
                        error=str(exc),
                    ),
                )
                await asyncio.sleep(delay)
            except CallerError as exc:
                await self._fail(task, exc.reason, str(exc))
                break
            except WindowReset:  # not a crash: the incarnation ends on purpose
                raise
            except Exception as exc:  # a bug: retry a little, then dead-letter as poison
                bugs += 1
                self.last_error = repr(exc)
                log.exception("agent crashed on a message", extra=logctx.ctx(task, agent=self.name))
                if self.on_exit is not None:  # supervised: this incarnation dies
                    delivery.crashes += 1
                    raise AgentCrashed(f"crash: {exc!r}") from exc
                if bugs > self.ctx.settings.bug_retries:
                    delivery.poison = f"agent {self.name} crashed on it: {exc!r}"
        if delivery.poison is not None:
            await self._poison(delivery, delivery.poison)
        self.processed += 1
        if delivery.msg is not None:
            await delivery.msg.ack()

    async def _work(self, task: Envelope) -> None:
        spec = self._spec_for(task.conversation_id)
        journal = await self.ctx.journal.load(self.name, task.conversation_id)
        if not any(e.id == task.id for e in journal):
            self.state = State.RUNNING
            await self.ctx.journal.append(self.name, task)
        while True:
            # read the journal afresh each step: the cache may have swapped the list
            journal = await self.ctx.journal.load(self.name, task.conversation_id)
            limits = self._limits()
            action = conv.next_action(spec, journal, task.id, self.name, limits)
            match action:
                case conv.Done(outcome=outcome):
                    await self._publish_outcome(task, outcome)
                    return
                case conv.CallLLM():
                    await self._call_llm(spec, task, journal, action)
                case conv.Summarise():
                    await self._summarise(spec, task, journal, action)
                case conv.ResetWindow():
                    await self._reset_window(task, action)
                case conv.RunTools(calls=calls, after=after):
                    for call in calls:
                        await self._run_tool(call, after)
                case conv.Reply(text=text):
                    reply = task.child(
                        ReplyPayload(task_id=task.id, text=text),
                        id=derived_id("reply", task.id),
                        sender=self.name,
                        recipient=task.sender,
                        step=self.step,
                    )
                    await self.ctx.journal.append(self.name, reply)
                case conv.Fail(reason=reason, message=message):
                    raise CallerError(message, reason)

    def _spec_for(self, conversation_id: str) -> AgentSpec:
        """The spec a conversation runs with: the loop guard's addendum, when it is for this
        conversation, ends the system prompt. Every decision and estimate of the task (what
        fits the window, what a summary leaves) sees the prompt the model will get."""
        prompt = with_addendum(self.spec.system_prompt, self.addendum, conversation_id)
        if prompt == self.spec.system_prompt:
            return self.spec
        return self.spec.model_copy(update={"system_prompt": prompt})

    async def _call_llm(
        self, spec: AgentSpec, task: Envelope, journal: list[Envelope], action: conv.CallLLM
    ) -> None:
        self.step = action.index + 1
        messages = conv.chat_messages(spec, journal)
        tokens = estimate_tokens(messages, self._tools()) + spec.max_tokens
        threshold = spec.context.threshold

        def fits(choice: ModelChoice) -> bool:
            window = choice.context_window
            return window is None or tokens <= Limits(window).budget(threshold)

        response = await self._send(
            task, lambda choice: self._request(task, action, choice, messages), fits
        )
        if response is None:  # failed over to a smaller window: shorten first (next step)
            log.info(
                "routed to a model whose context window the call does not fit; shortening",
                extra=logctx.ctx(task, agent=self.name, tokens=tokens),
            )
            return
        self._count(response)
        # The request travels on core NATS and is not recorded (it carries the whole history).
        # The journaled response stands for the LLM call: see _llm_entry.
        entry = self._llm_entry(task, response, derived_id("llm_response", action.request_id))
        await self.ctx.journal.append(self.name, entry)

    async def _send(
        self,
        task: Envelope,
        build: Callable[[ModelChoice], Envelope],
        fits: Callable[[ModelChoice], bool] | None = None,
    ) -> Envelope | None:
        """One LLM call through the gateway, on the route the breakers allow: failed over,
        failed back, or paused until a provider takes it. The `llm_response`, or None when
        the route's model cannot take the request (`fits`), sent nowhere."""
        while True:
            route = self.ctx.circuits.route(self.spec.models)
            # what this route changes (failed over or back) is reported once a call on it
            # succeeds: a call refused while another agent's trial runs changes nothing
            moved = failover.decisions(
                self.name, self.spec.models, self.provider, self.paused_on, route, self.seen
            )
            if isinstance(route, failover.Pause):
                await self._paused(task, route, moved)
                continue
            if fits is not None and not fits(route.choice):
                return None
            request = build(route.choice)
            if self.paused_on is None:
                self.state = State.WAITING_ON_LLM
            sent_at = self.ctx.circuits.now()
            try:
                response = await llm.call(self.ctx.nc, request, self.ctx.settings.llm_timeout_s)
            except llm.CircuitOpen as exc:
                # no retry burnt: the next route skips this provider (or pauses)
                self.ctx.circuits.refused(route.provider, str(exc), sent_at)
                self.last_error = f"{exc.reason.value}: {exc}"
                log.info(
                    "provider breaker open; re-routing the call",
                    extra=logctx.ctx(request, agent=self.name, provider=route.provider),
                )
                continue
            self.ctx.circuits.succeeded(route.provider)
            self._routed(task, route.provider, moved)
            self.state = State.RUNNING
            return response

    def _count(self, response: Envelope) -> None:
        if response.usage:
            self.tokens += response.usage.total

    def _llm_entry(
        self, task: Envelope, response: Envelope, entry_id: str, **update: Any
    ) -> Envelope:
        """The journal entry that stands for an LLM call: it takes the request's span,
        under the task, so the gateway's events about the call nest beneath it."""
        return response.model_copy(
            update={
                "id": entry_id,
                "recipient": self.name,
                "span_id": response.parent_span_id or response.span_id,
                "parent_span_id": task.span_id,
                **update,
            }
        )

    def _retry_delay(self, attempt: int) -> float:
        return _backoff(attempt, self.ctx.settings)

    def _tools(self) -> tuple[ToolSpec, ...]:
        return tuple(get_tool(t).spec for t in self.spec.tools)

    def _limits(self) -> Limits | None:
        """The context window the next call must fit: that of the model it is routed to
        (the preferred one while paused); None when the spec knows no window (an agent
        built outside a deployment, which fills windows in)."""
        route = self.ctx.circuits.route(self.spec.models)
        choice = route.choice if isinstance(route, failover.Use) else self.spec.models[0]
        if choice.context_window is None:
            return None
        return Limits(choice.context_window, self._tools())

    def _request(
        self,
        task: Envelope,
        action: conv.CallLLM,
        choice: ModelChoice,
        messages: tuple[ChatMessage, ...],
    ) -> Envelope:
        return llm.request(
            task,
            self.name,
            self.step,
            action.request_id,
            choice,
            messages,
            self.spec.max_tokens,
            self._tools(),
            json_output=self.spec.output == "json",
        )

    @property
    def seen(self) -> dict[str, failover.Seen]:
        return self.ctx.circuits.seen

    async def _paused(
        self, task: Envelope, route: failover.Pause, decisions: list[failover.Decision]
    ) -> None:
        """Wait, holding the message, for news of a breaker or the re-check time. The
        caller then routes again: a paused agent's call is a probe that resumes it only
        when it succeeds."""
        for decision in decisions:  # agent_paused, the first time round
            self._report(task, decision)
        if self.paused_on is None:
            self.paused_on, self.paused_at = route.provider, time.monotonic()
            self.last_error = f"{Reason.CIRCUIT_OPEN.value}: {route.reason}"
            self.state = State.PAUSED
            log.warning(
                "paused: every provider's breaker is open; the message waits, unacknowledged",
                extra=logctx.ctx(task, agent=self.name, provider=route.provider),
            )
        await self.ctx.circuits.wait_change(max(route.recheck_in_s, MIN_RECHECK_S))

    def _routed(self, task: Envelope, provider: str, moved: list[failover.Decision]) -> None:
        """A call on `provider` succeeded: report what that changed."""
        if self.paused_on is not None:
            paused_s = time.monotonic() - (self.paused_at or time.monotonic())
            moved = [failover.resumed(self.name, provider, self.paused_on, paused_s)]
            self.paused_on, self.paused_at = None, None
        for decision in moved:
            self._report(task, decision)
        self.provider = provider

    def _report(self, task: Envelope, decision: failover.Decision) -> None:
        log.info(decision.name, extra=logctx.ctx(task, **decision.data))
        if self.ctx.events is not None:
            self.ctx.events.emit(decision.name, decision.data, task)

    async def _run_tool(self, call: ToolCall, after: Envelope) -> None:
        self.state = State.WAITING_ON_TOOL
        started = time.perf_counter()
        result: str | None
        error: str | None = None
        try:
            if call.name not in self.spec.tools:
                raise CallerError(
                    f"agent {self.name} has no tool {call.name!r}; it has {list(self.spec.tools)}",
                    Reason.UNKNOWN_TOOL,
                )
            result = await get_tool(call.name).run(call.arguments)
        except Crash:
            raise
        except BeamlineError as exc:
            result, error = str(exc), exc.reason.value
        except Exception as exc:  # the tool's own failure is the LLM's to handle, not a crash
            result, error = f"{type(exc).__name__}: {exc}", Reason.TOOL_FAILED.value
        self.state = State.RUNNING
        entry = after.child(
            ToolResultPayload(
                call_id=call.id,
                name=call.name,
                arguments=call.arguments,
                result=result,
                error_reason=error,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            ),
            id=derived_id("tool", after.id, call.id),
            sender=f"tool.{call.name}",
            recipient=self.name,
        )
        await self.ctx.journal.append(self.name, entry)

    async def _fail(self, task: Envelope, reason: Reason, message: str) -> None:
        self.failed += 1
        self.last_error = f"{reason.value}: {message}"
        error = task.child(
            ErrorPayload(reason=reason.value, message=message, task_id=task.id),
            id=derived_id("error", task.id),
            sender=self.name,
            recipient=task.sender,
        )
        await self.ctx.journal.append(self.name, error)
        await self._publish_outcome(task, error)

    async def _poison(self, delivery: Delivery, detail: str) -> None:
        """Dead-letter the task and answer it with an error: it is not tried again."""
        task = delivery.task
        await dead_letter(
            self.ctx.js,
            origin="agent",
            reason=Reason.POISON,
            detail=detail,
            subject=subjects.inbox(self.name),
            data=bus.encode(task),
            key=task.id,
            trace_id=task.trace_id,
        )
        await self._fail(task, Reason.POISON, detail)

    async def _publish_outcome(self, task: Envelope, outcome: Envelope) -> None:
        await bus.publish(self.ctx.js, subjects.reply(task.conversation_id), outcome)
        reply_to = task.payload.reply_to if isinstance(task.payload, TaskPayload) else None
        if reply_to:
            await self.ctx.nc.publish(
                reply_to, bus.encode(outcome), headers=bus.headers_for(outcome)
            )
        kind = "replied" if isinstance(outcome.payload, ReplyPayload) else "failed"
        log.info(f"task {kind}", extra=logctx.ctx(outcome, agent=self.name))


def _backoff(attempt: int, settings: AgentHostSettings) -> float:
    """Capped exponential backoff with full jitter."""
    return random.uniform(0, min(settings.retry_cap_s, settings.retry_base_s * 2 ** (attempt - 1)))
