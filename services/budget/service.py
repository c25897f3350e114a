"""The budget service's NATS shell: turns requests and call events into ledger calls, and
the ledger's answers into replies, events and reports to the supervisor.

    bl.budget.reserve   (gateway, request/reply)   hold a call's estimate, or refuse it
    bl.budget.raise     (operator)                 raise an account's limits
    bl.budget.show      (operator)                 spend, holds and limits
    BL_EVENTS, durable consumer `budget` on bl.events.gateway.>: settle or release holds
    bl.sup.budget       (request to the supervisor) stop an exhausted subtree; re-sent
                        until the leader acknowledges

Every ledger change is made in memory at once (no await between reading the ledger and
changing it) and persisted (`LedgerStore`) before the answer that depends on it, so the
persisted ledger is always what was answered. Concurrent reservations share their writes
(`KVRecord` group-commits). The per-conversation itemisation is persisted every
`itemisation_flush_s` and at stop: no answer depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ConfigDict, ValidationError

from beamline import bus, config, nats_auth, streams, subjects
from beamline.budget import (
    Account,
    AccountKind,
    BudgetReply,
    RaiseRequest,
    ReserveRequest,
    ShowRequest,
    SubtreeExhausted,
)
from beamline.config import Deployment
from beamline.control import ControlReply
from beamline.envelope import Envelope, EventPayload, Kind
from beamline.errors import CallerError, Reason
from beamline.events import EventSink
from beamline.feed import Feed
from beamline.requests import parse_request as _parse
from beamline.service import answer_health, crash_on_error, every
from beamline.settings import MeshSettings
from services.budget.ledger import Deferred, Granted, Hold, Ledger, LedgerError, Refused
from services.budget.settings import BudgetSettings
from services.budget.store import LedgerStore

log = logging.getLogger("beamline.budget")

SERVICE = "budget"
COMMANDS = ("reserve", "raise", "show")
REQUEST_MAX_BYTES = 64 * 1024
GATEWAY_EVENTS = "bl.events.gateway.>"  # settles use two of them; breakers' are skipped
SETTLE_RETRY_S = 1.0  # after a failed ledger write, the same call events again
REPORT_CONVERSATIONS = 1000  # = the supervisor's BULK_EVENT_NAMES
REQUESTS_IN_FLIGHT = 256  # answered at once; past this the subscription waits its turn


class CallOutcome(BaseModel):
    """The part of a gateway `llm_call_completed` / `llm_call_failed` event's data used here."""

    model_config = ConfigDict(extra="ignore")

    request_id: str
    provider: str
    model: str
    agent: str = ""  # absent from events of gateways older than budgets: the hold says
    input_tokens: int = 0
    output_tokens: int = 0


class BudgetService:
    def __init__(
        self,
        settings: BudgetSettings,
        deployment: Deployment,
        nc: NATS,
        store: LedgerStore,
        ledger: Ledger,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.deployment, self.nc = settings, deployment, nc
        self.store, self.ledger, self.clock = store, ledger, clock
        self.events = EventSink(nc.jetstream(), SERVICE)
        # no acks: the ledger's `applied_seq`, persisted with every settle, is the position
        self.outcomes = Feed(
            nc.jetstream(),
            stream=subjects.STREAM_EVENTS,
            consumer=subjects.CONSUMER_BUDGET,
            filter_subject=GATEWAY_EVENTS,
            what="call events",
            batch=settings.fetch_batch,
            linger_s=settings.settle_linger_s,
            retry_s=SETTLE_RETRY_S,
            failed=self._failed,
        )
        self._itemisation_saved = 0  # ledger.itemisation_changes when last persisted
        self._wake = asyncio.Event()
        self._subs: list[Subscription] = []
        self._answering: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(REQUESTS_IN_FLIGHT)
        self._loops: list[asyncio.Task[None]] = []
        self.counts = {
            "granted": 0,
            "deferred": 0,
            "refused": 0,
            "settled": 0,
            "released": 0,
            "expired": 0,
        }
        self.last_error: str | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.events.start()
        # the consumer resumes before this service says it is up: no call settled meanwhile
        # is missed; a first start counts from now on, not a week of history
        applied = self.ledger.record.applied_seq
        await self.outcomes.open(applied or None)
        if self.outcomes.seq < applied:  # BL_EVENTS was made again: its sequence restarted
            self.ledger.record.applied_seq = self.outcomes.seq
        self._subs.append(
            await self.nc.subscribe(
                subjects.BUDGET_ALL, queue=subjects.QUEUE_BUDGET, cb=self.on_request
            )
        )
        self._subs.append(await answer_health(self.nc, SERVICE, self.status))
        for name, loop in (
            ("settle", self.outcomes.run(self._settle)),
            ("sweep", self._sweep_loop()),
            ("report", self._report_loop()),
            (
                "itemisation",
                every(
                    self.settings.itemisation_flush_s,
                    self._save_itemisation,
                    "itemisation not persisted",
                    self._failed,
                ),
            ),
        ):
            task = asyncio.create_task(loop, name=name)
            task.add_done_callback(crash_on_error)
            self._loops.append(task)
        self._wake.set()  # exhaustions persisted but not yet acknowledged: report them
        log.info("serving", extra={"subject": subjects.BUDGET_ALL, "revision": self.store.revision})

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._answering:  # answers under way are given: their callers wait for them
            await asyncio.wait(self._answering, timeout=5.0)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        try:
            await self._save_itemisation()
        except Exception:  # NATS down at stop: the last flush_s of itemisation is lost
            log.warning("itemisation not persisted at stop", exc_info=True)
        await self.events.close(timeout=5.0)

    def status(self) -> dict[str, Any]:
        record = self.ledger.record
        return {
            "revision": self.store.revision,
            "accounts": len(record.spent),
            "holds": len(record.holds),
            "exhausted": sorted(record.exhausted),
            "applied_seq": record.applied_seq,
            "events_dropped": self.events.dropped,
            "last_error": self.last_error,
            **self.counts,
        }

    # --- requests -------------------------------------------------------------------------

    async def on_request(self, msg: Msg) -> None:
        """The subscription's callback, which NATS awaits one message at a time: each
        request is answered in a task of its own, so concurrent reservations share their
        ledger writes instead of queueing for one each."""
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(msg), name="answer")
        self._answering.add(task)
        task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task[None]) -> None:
        self._answering.discard(task)
        self._slots.release()
        crash_on_error(task)

    async def _answer(self, msg: Msg) -> None:
        command = subjects.last_token(msg.subject, -1)
        handlers: dict[str, Callable[[bytes], Awaitable[BudgetReply]]] = {
            "reserve": self._reserve,
            "raise": self._raise,
            "show": self._show,
        }
        try:
            bus.check_size(msg.data, REQUEST_MAX_BYTES)
            handler = handlers.get(command)
            if handler is None:
                raise CallerError(
                    f"unknown command {msg.subject!r}: bl.budget.{'|'.join(COMMANDS)}",
                    Reason.INVALID_SCHEMA,
                )
            reply = await handler(msg.data)
        except CallerError as exc:
            self.last_error = exc.message
            log.info("request refused", extra={"subject": msg.subject, "error": exc.message})
            reply = BudgetReply(ok=False, reason=exc.reason.value, error=exc.message)
        except Exception as exc:  # the ledger could not be persisted (NATS, JetStream down)
            self.last_error = f"{msg.subject}: {exc!r}"
            log.exception("request failed; answered unavailable", extra={"subject": msg.subject})
            why = f"the budget ledger could not be persisted ({exc!r}); nothing was granted"
            reply = BudgetReply(ok=False, reason=Reason.BUDGET_UNAVAILABLE.value, error=why)
        if msg.reply:
            try:
                await msg.respond(reply.model_dump_json(exclude_none=True).encode())
            except Exception as exc:  # NATS reconnecting: the caller's request times out
                log.warning("answer not sent", extra={"subject": msg.subject, "error": repr(exc)})

    async def _reserve(self, data: bytes) -> BudgetReply:
        request = _parse(ReserveRequest, data)
        if self.deployment.member_spec(request.agent) is None:
            raise CallerError(
                f"no agent named {request.agent!r} in this deployment", Reason.UNKNOWN_RECIPIENT
            )
        chain = self.deployment.budget_chain(request.agent)
        price = self.deployment.price(request.provider, request.model)
        outcome = self.ledger.reserve(
            request, chain, price, self.clock(), self.settings.reservation_ttl_s
        )
        unchanged = isinstance(outcome, Deferred) or (
            isinstance(outcome, Refused) and not outcome.newly_exhausted
        )
        if not unchanged:  # a grant, even a repeated one, waits for the write holding it
            try:
                await self._save()
            except Exception:
                if isinstance(outcome, Granted):  # not persisted: not granted either
                    self.ledger.release(request.request_id)
                raise
            if isinstance(outcome, Granted) and request.request_id not in self.ledger.record.holds:
                # a repeat of a request whose first grant failed to persist meanwhile
                raise RuntimeError(f"the hold of {request.request_id} was not persisted")
        trace = {"trace_id": request.trace_id, "request_id": request.request_id}
        if isinstance(outcome, Granted):
            self.counts["granted"] += 1
            return BudgetReply(result={"tokens": outcome.hold.tokens, "usd": outcome.hold.usd})
        if isinstance(outcome, Deferred):
            self.counts["deferred"] += 1
            log.info("reservation deferred", extra={**trace, "account": outcome.account})
            return BudgetReply(ok=False, reason=Reason.BUDGET_HELD.value, error=outcome.explain())
        self.counts["refused"] += 1
        log.warning(
            "reservation refused; the subtree will be stopped",
            extra={**trace, "account": outcome.account, "agent": request.agent},
        )
        self.events.emit_envelope(_refused_event(request, outcome))
        if outcome.newly_exhausted:
            self._wake.set()
        return BudgetReply(
            ok=False,
            reason=Reason.BUDGET_EXHAUSTED.value,
            error=outcome.explain(),
            result={"account": outcome.account, "needed_tokens": outcome.needed.tokens},
        )

    async def _raise(self, data: bytes) -> BudgetReply:
        request = _parse(RaiseRequest, data)
        account = self._account(request.kind, request.name)
        before = self.ledger.limit(account)
        record = self.ledger.record
        undo = (record.raised.get(account.key), record.exhausted.get(account.key))
        was_exhausted = undo[1] is not None
        try:
            after = self.ledger.raise_limit(account, request.budget)
        except LedgerError as exc:
            raise CallerError(str(exc), Reason.INVALID_SCHEMA) from None
        try:
            await self._save()
        except Exception:  # not persisted: not raised either (the caller is told)
            self.ledger.undo_raise(account, *undo)
            raise
        data_ = {
            "account": account.key,
            "from": before.model_dump(exclude_none=True) if before else None,
            "to": after.model_dump(exclude_none=True),
            "was_exhausted": was_exhausted,
            "requested_by": request.requested_by,
        }
        self.events.emit("budget_raised", data_)
        log.info("budget raised", extra=data_)
        return BudgetReply(result={**self.ledger.view(account), "was_exhausted": was_exhausted})

    async def _show(self, data: bytes) -> BudgetReply:
        request = _parse(ShowRequest, data)
        if request.name is not None:
            accounts = [self._account(None, request.name)]
        else:
            # the declared agents, and the pool members that spent or hold anything
            record, prefix = self.ledger.record, f"{AccountKind.AGENT.value}:"
            names = {agent.name for agent in self.deployment.agents}
            names |= {key.removeprefix(prefix) for key in record.spent if key.startswith(prefix)}
            names |= {hold.agent for hold in record.holds.values()}
            known = [n for n in sorted(names) if self.deployment.member_spec(n) is not None]
            keys = {a.key: a for name in known for a in self._chain(name)}
            accounts = [a for a in keys.values() if a.budget or a.key in record.spent]
        return BudgetReply(result={"accounts": [self.ledger.view(a) for a in accounts]})

    # --- call outcomes -------------------------------------------------------------------

    async def _settle(self, msgs: list[Msg]) -> None:
        """Apply, then persist: a failed write (NATS down) raises, and the feed hands the
        same events over again, which `applied_seq` skips, until the write succeeds."""
        for msg in msgs:
            self._apply(msg)
        await self._save()

    def _failed(self, error: str) -> None:
        self.last_error = error

    def _apply(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq <= self.ledger.record.applied_seq:
            return  # applied before: read again after a restart, or a failed write
        self.ledger.record.applied_seq = seq
        name = subjects.last_token(msg.subject, -1)
        if msg.subject not in (subjects.LLM_CALL_COMPLETED, subjects.LLM_CALL_FAILED):
            return
        try:
            env = bus.decode(msg.data, REQUEST_MAX_BYTES)
            data = env.payload.data if isinstance(env.payload, EventPayload) else None
            call = CallOutcome.model_validate(data)
        except (CallerError, ValidationError) as exc:
            log.warning("call event unreadable; skipped", extra={"seq": seq, "error": str(exc)})
            return
        if msg.subject == subjects.LLM_CALL_FAILED:
            if self.ledger.release(call.request_id) is not None:
                self.counts["released"] += 1
            return
        chain = self.deployment.budget_chain(call.agent) if call.agent else ()
        actual = self.ledger.settle(
            call.request_id,
            call.agent,
            chain,
            call.input_tokens,
            call.output_tokens,
            self.deployment.price(call.provider, call.model),
            env.conversation_id,
        )
        self.counts["settled"] += 1
        log.debug(
            "call settled",
            extra={"trace_id": env.trace_id, "event": name, "tokens": actual.tokens},
        )

    async def _sweep_loop(self) -> None:
        expired: list[Hold] = []  # charged in memory, reported once persisted
        while True:
            await asyncio.sleep(self.settings.sweep_s)
            expired += self.ledger.expire(self.clock(), self.settings.late_window_s)
            if not expired:
                continue
            if not await self._saved("expired reservations"):
                continue
            for hold in expired:
                self.counts["expired"] += 1
                data = {"request_id": hold.request_id, "agent": hold.agent, "tokens": hold.tokens}
                log.warning("reservation expired unsettled; charged at its estimate", extra=data)
                self.events.emit("reservation_expired", {**data, "usd": hold.usd})
            expired = []

    # --- reports to the supervisor -------------------------------------------------------

    async def _report_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.report_retry_s)
            self._wake.clear()
            for key in list(self.ledger.unreported()):
                if await self._report(key):
                    # unsaved, a restart reports it again: the supervisor knows its id
                    self.ledger.mark_reported(key)
                    await self._saved("an exhaustion's report")

    async def _report(self, key: str) -> bool:
        """Ask the leading supervisor to stop the subtree; True once acknowledged."""
        kind, name = key.split(":", 1)
        account = self._account(AccountKind(kind), name)
        exhaustion = self.ledger.record.exhausted.get(key)
        if exhaustion is None:  # raised meanwhile: nothing to stop any more
            return True
        if not self.deployment.supervisors:
            log.warning("budget exhausted; no supervisor declared, so its calls stay refused")
            return True
        limit = self.ledger.limit(account)
        if limit is None:  # the deployment changed: the account has no limit any more
            return True
        agents = {
            *self.ledger.record.conversations,
            *(h.agent for h in self.ledger.record.holds.values()),
        }
        under = [a for a in agents if key in self._keys(a)]
        spent = self.ledger.spent(key)
        report = SubtreeExhausted(
            kind=account.kind,
            name=account.name,
            limit=limit,
            spent_tokens=spent.tokens,
            spent_usd=spent.usd,
            refused_request=exhaustion.request_id,
            refused_agent=exhaustion.agent,
            # bounded: one NATS message, and the supervisor's event names no more anyway
            conversations=tuple(self.ledger.conversations(under)[-REPORT_CONVERSATIONS:]),
        )
        try:
            msg = await self.nc.request(
                subjects.SUBTREE_EXHAUSTED,
                report.model_dump_json().encode(),
                timeout=self.settings.supervisor_timeout_s,
            )
            reply = ControlReply.model_validate_json(msg.data)
        except Exception as exc:  # no supervisor, timeout, NATS down, an unreadable answer
            self.last_error = f"supervisor did not acknowledge {key} exhausted: {exc!r}"
            log.warning("exhaustion not acknowledged; will re-send", extra={"account": key})
            return False
        if not reply.ok:
            log.error("supervisor refused the exhaustion report", extra={"error": reply.error})
        log.info("exhaustion reported to the supervisor", extra={"account": key})
        return True

    # --- helpers -------------------------------------------------------------------------

    async def _save_itemisation(self) -> None:
        changes = self.ledger.itemisation_changes
        if changes != self._itemisation_saved:
            await self.store.save_itemisation(self.ledger.record)
            self._itemisation_saved = changes

    async def _save(self) -> None:
        await self.store.save(self.ledger.record)

    async def _saved(self, what: str) -> bool:
        """`_save` for a background loop: a failed write (NATS unavailable for now) leaves
        the change in memory for the next write, instead of ending the service."""
        try:
            await self._save()
        except Exception as exc:
            self.last_error = f"{what} not persisted: {exc!r}"
            log.warning(f"{what} not persisted; retrying", extra={"error": repr(exc)})
            return False
        return True

    def _chain(self, agent: str) -> tuple[Account, ...]:
        return self.deployment.budget_chain(agent)

    def _keys(self, agent: str) -> set[str]:
        return {a.key for a in self._chain(agent)}

    def _account(self, kind: AccountKind | None, name: str) -> Account:
        """An agent's or supervisor's account by name (`kind` decides when both exist)."""
        supervisors = {s.name: s for s in self.deployment.supervisors}
        agent = self.deployment.member_spec(name)
        found = []
        if kind in (None, AccountKind.SUPERVISOR) and name in supervisors:
            found.append(
                Account(kind=AccountKind.SUPERVISOR, name=name, budget=supervisors[name].budget)
            )
        if kind in (None, AccountKind.AGENT) and agent is not None:
            found.append(Account(kind=AccountKind.AGENT, name=name, budget=agent.budget))
        if not found:
            raise CallerError(
                f"no {kind.value if kind else 'agent or supervisor'} named {name!r}",
                Reason.UNKNOWN_RECIPIENT,
            )
        if len(found) > 1:
            raise CallerError(
                f"{name!r} names an agent and a supervisor: say which (kind)",
                Reason.INVALID_SCHEMA,
            )
        return found[0]


def _refused_event(request: ReserveRequest, refused: Refused) -> Envelope:
    """In the refused call's own trace and conversation, so `beamline trace` shows why."""
    fields: dict[str, Any] = {"conversation_id": request.conversation_id or SERVICE}
    if request.trace_id:
        fields["trace_id"] = request.trace_id
    return Envelope(
        kind=Kind.EVENT,
        sender=SERVICE,
        recipient=request.agent,
        payload=EventPayload(
            name="reservation_refused",
            data={
                "request_id": request.request_id,
                "agent": request.agent,
                "account": refused.account,
                "limit": refused.limit.model_dump(exclude_none=True),
                "spent_tokens": refused.spent.tokens,
                "spent_usd": refused.spent.usd,
                "held_tokens": refused.held.tokens,
                "needed_tokens": refused.needed.tokens,
                "needed_usd": refused.needed.usd,
                "newly_exhausted": refused.newly_exhausted,
            },
        ),
        **fields,
    )


async def main(stop: asyncio.Event) -> None:
    mesh, settings = MeshSettings(), BudgetSettings()
    deployment = config.load(mesh.config)  # a bad file stops us here, before connecting
    nc = await bus.connect(mesh.nats_url, SERVICE)
    try:
        js = nc.jetstream()
        await streams.require_layout(js, nats_auth.USES[nats_auth.Role.BUDGET], mesh.layout_wait_s)
        store = LedgerStore(await js.key_value(subjects.BUCKET_BUDGET))
        ledger = Ledger(await store.load())
        service = BudgetService(settings, deployment, nc, store, ledger)
        await service.start()
        await stop.wait()
        log.info("stopping: no new requests")
        await service.stop()
    finally:
        await bus.drain(nc)
