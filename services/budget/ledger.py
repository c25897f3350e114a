"""The budget ledger: pure accounting, no I/O, the clock passed in.

Each call is charged to a chain of accounts (the agent's, then each ancestor supervisor's).
Before the call, `reserve` holds its estimate on every account of the chain, and refuses
when any of them cannot cover it on top of what is spent and already held: concurrent calls
can never together pass a limit, and a call can overspend only by its own estimate's error.
A call that the spend alone leaves room for is only deferred (retried by its agent) while
holds of calls in flight are in the way: estimates are upper bounds, and the subtree is
stopped only when what it really spent leaves no room.
`settle` replaces the hold with the actual usage; `release` drops it (the call failed, so
the provider did not bill it); `expire` charges a hold never settled at its estimate: a
gateway that died mid-call may well have been billed, and spend must never be lost. A late
outcome for an expired hold corrects that charge to the actual usage.

The whole state is one pydantic value (`LedgerRecord`) the service persists after every
change. `applied_seq` is the stream sequence of the last call event applied, so an event
redelivered after a restart (applied, persisted, then not acked) is not charged twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from beamline.budget import Account, Budget, ConversationSpend, Price, ReserveRequest

CONVERSATIONS_PER_AGENT = 50  # the latest conversations each agent's spend is itemised for
# ... and of all agents together: the itemisation is one KV value (1 MiB at most, ~85 bytes
# an entry); past this the busiest agent's oldest entry goes first
CONVERSATIONS_MAX = 5_000
USD_EPSILON = 1e-12  # float sums: a cost equal to the limit must fit


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Spend(_Model):
    tokens: int = 0
    usd: float = 0.0
    calls: int = 0


class Hold(_Model):
    """A reservation: the estimate held on every account of the chain until settled."""

    request_id: str
    agent: str
    accounts: tuple[str, ...]
    tokens: int
    usd: float
    conversation_id: str = ""
    expires_at: float  # clock time; `late_until` once expired and charged
    charged: bool = False  # expired: its estimate is charged, a late outcome corrects it


class Exhaustion(_Model):
    """An account that refused a reservation; reported to the supervisor once."""

    request_id: str
    agent: str
    reported: bool = False


class Itemisation(_Model):
    """The per-conversation spend, persisted apart from the ledger (services/budget/store)."""

    conversations: dict[str, dict[str, Spend]] = Field(default_factory=dict)  # agent -> conv


class LedgerRecord(_Model):
    spent: dict[str, Spend] = Field(default_factory=dict)
    holds: dict[str, Hold] = Field(default_factory=dict)
    late: dict[str, Hold] = Field(default_factory=dict)  # expired, kept for late outcomes
    raised: dict[str, Budget] = Field(default_factory=dict)
    exhausted: dict[str, Exhaustion] = Field(default_factory=dict)
    conversations: dict[str, dict[str, Spend]] = Field(default_factory=dict)  # agent -> conv
    applied_seq: int = 0


@dataclass(frozen=True)
class Granted:
    hold: Hold
    again: bool = False  # the same request id reserved before: nothing new is held


@dataclass(frozen=True)
class Refused:
    account: str  # the outermost account that cannot cover the call
    limit: Budget
    spent: Spend
    held: Spend
    needed: Spend
    newly_exhausted: bool  # first refusal since the last raise: report it

    def explain(self) -> str:
        parts = []
        if self.limit.tokens is not None:
            parts.append(
                f"{self.spent.tokens} of {self.limit.tokens} tokens spent, {self.held.tokens} "
                f"held, this call needs up to {self.needed.tokens}"
            )
        if self.limit.usd is not None:
            parts.append(
                f"${self.spent.usd:.6f} of ${self.limit.usd:.6f} spent, ${self.held.usd:.6f} "
                f"held, this call needs up to ${self.needed.usd:.6f}"
            )
        name = self.account.split(":", 1)[1]
        flags = " ".join(
            f"--{what} N" for what in ("tokens", "usd") if getattr(self.limit, what) is not None
        )
        return (
            f"budget of {self.account} cannot cover this call ({'; '.join(parts)}); its "
            f"subtree is stopped: raise it with `beamline budget raise {name} {flags}`"
        )


@dataclass(frozen=True)
class Deferred:
    """The call fits the account's budget on what is spent, but not on top of what calls in
    flight hold: it must wait for them to settle (usually below their estimates), not stop
    the subtree. Nothing is held and nothing is recorded as exhausted."""

    account: str
    held: Spend
    needed: Spend

    def explain(self) -> str:
        return (
            f"budget of {self.account} is held by calls in flight ({self.held.tokens} tokens, "
            f"${self.held.usd:.6f}); this call (up to {self.needed.tokens} tokens, "
            f"${self.needed.usd:.6f}) fits once they settle: retry shortly"
        )


class LedgerError(ValueError):
    """An operator's request the ledger refuses (e.g. lowering a budget)."""


class Ledger:
    def __init__(self, record: LedgerRecord | None = None) -> None:
        self.record = record or LedgerRecord()
        self._itemised = sum(len(c) for c in self.record.conversations.values())
        self.itemisation_changes = 0  # the service persists the itemisation when this moved
        # what the holds add up to per account, kept as holds come and go: a reservation
        # checks its chain without summing every call in flight
        self._held: dict[str, Spend] = {}
        for hold in self.record.holds.values():
            self._count_hold(hold, 1)

    # --- limits ----------------------------------------------------------------------

    def limit(self, account: Account) -> Budget | None:
        """The account's limit: the file's, raised by any runtime raise."""
        raised = self.record.raised.get(account.key)
        if account.budget is None:
            return raised
        return account.budget.raised(raised)

    def raise_limit(self, account: Account, budget: Budget) -> Budget:
        """Raise `account`'s limits to `budget` (each one it sets); lowering is refused.
        Clears the account's exhaustion, so a new refusal is reported again."""
        current = self.limit(account)
        for what in ("tokens", "usd"):
            new, old = getattr(budget, what), getattr(current, what, None) if current else None
            if new is not None and old is not None and new < old:
                raise LedgerError(
                    f"{account.key}: {what} {new} is below the current limit {old}; budgets "
                    "are only raised at run time (lower one in the deployment file)"
                )
        self.record.raised[account.key] = budget.raised(self.record.raised.get(account.key))
        self.record.exhausted.pop(account.key, None)
        limit = self.limit(account)
        assert limit is not None
        return limit

    def undo_raise(
        self, account: Account, raised: Budget | None, exhaustion: Exhaustion | None
    ) -> None:
        """Put back what `raise_limit` changed, given what was there before it: the raise
        could not be persisted, and its requester was told so."""
        if raised is None:
            self.record.raised.pop(account.key, None)
        else:
            self.record.raised[account.key] = raised
        if exhaustion is not None:
            self.record.exhausted[account.key] = exhaustion

    # --- reservations ------------------------------------------------------------------

    def reserve(
        self,
        request: ReserveRequest,
        chain: Sequence[Account],
        price: Price | None,
        now: float,
        ttl_s: float,
    ) -> Granted | Refused | Deferred:
        known = self.record.holds.get(request.request_id)
        if known is not None:
            return Granted(known, again=True)
        tokens = request.input_tokens + request.output_tokens
        usd = price.cost(request.input_tokens, request.output_tokens) if price else 0.0
        needed = Spend(tokens=tokens, usd=usd)
        short: Refused | None = None
        busy: Deferred | None = None
        for account in chain:  # the outermost short account is the subtree to stop
            limit = self.limit(account)
            if limit is None:
                continue
            spent, held = self.spent(account.key), self.held(account.key)
            if _over(limit, spent, needed):
                short = Refused(account.key, limit, spent, held, needed, False)
            elif _over(
                limit, Spend(tokens=spent.tokens + held.tokens, usd=spent.usd + held.usd), needed
            ):
                busy = Deferred(account.key, held, needed)
        if short is None and busy is not None:
            return busy
        if short is not None:
            newly = short.account not in self.record.exhausted
            if newly:
                self.record.exhausted[short.account] = Exhaustion(
                    request_id=request.request_id, agent=request.agent
                )
            return Refused(short.account, short.limit, short.spent, short.held, needed, newly)
        hold = Hold(
            request_id=request.request_id,
            agent=request.agent,
            accounts=tuple(a.key for a in chain),
            tokens=tokens,
            usd=usd,
            conversation_id=request.conversation_id,
            expires_at=now + ttl_s,
        )
        self.record.holds[hold.request_id] = hold
        self._count_hold(hold, 1)
        return Granted(hold)

    def settle(
        self,
        request_id: str,
        agent: str,
        chain: Sequence[Account],
        input_tokens: int,
        output_tokens: int,
        price: Price | None,
        conversation_id: str = "",
    ) -> Spend:
        """Charge a call's actual usage: to its hold's accounts, or (a call made without a
        reservation: an agent with no budget on its chain) to `chain`."""
        hold = self._drop_hold(request_id) or self.record.late.pop(request_id, None)
        accounts = hold.accounts if hold else tuple(a.key for a in chain)
        if not accounts:  # no hold and no agent known: nobody to charge
            return Spend()
        if hold is not None and hold.charged:  # expired and charged at its estimate
            self._charge(accounts, Spend(tokens=-hold.tokens, usd=-hold.usd, calls=-1))
        actual = Spend(
            tokens=input_tokens + output_tokens,
            usd=price.cost(input_tokens, output_tokens) if price else 0.0,
            calls=1,
        )
        self._charge(accounts, actual)
        self._itemise(hold.agent if hold else agent, conversation_id, actual)
        return actual

    def release(self, request_id: str) -> Hold | None:
        """The call failed: nothing was spent (a provider does not bill a failed call)."""
        hold = self._drop_hold(request_id)
        if hold is None:
            late = self.record.late.pop(request_id, None)
            if late is not None and late.charged:
                self._charge(late.accounts, Spend(tokens=-late.tokens, usd=-late.usd, calls=-1))
            return late
        return hold

    def expire(self, now: float, late_window_s: float) -> list[Hold]:
        """Charge holds past their time at their estimate; forget expired ones past the
        late window. Returns the holds charged now."""
        for rid in [r for r, h in self.record.late.items() if h.expires_at <= now]:
            del self.record.late[rid]
        expired = [h for h in self.record.holds.values() if h.expires_at <= now]
        for hold in expired:
            self._drop_hold(hold.request_id)
            self._charge(hold.accounts, Spend(tokens=hold.tokens, usd=hold.usd, calls=1))
            late = hold.model_copy(update={"charged": True, "expires_at": now + late_window_s})
            self.record.late[hold.request_id] = late
        return expired

    # --- views ---------------------------------------------------------------------------

    def spent(self, key: str) -> Spend:
        return self.record.spent.get(key) or Spend()

    def held(self, key: str) -> Spend:
        return self._held.get(key) or Spend()

    def view(self, account: Account) -> dict[str, object]:
        limit = self.limit(account)
        spent, held = self.spent(account.key), self.held(account.key)
        return {
            "account": account.key,
            "limit": limit.model_dump(exclude_none=True) if limit else None,
            "spent_tokens": spent.tokens,
            "spent_usd": round(spent.usd, 9),
            "calls": spent.calls,
            "held_tokens": held.tokens,
            "held_usd": round(held.usd, 9),
            "exhausted": account.key in self.record.exhausted,
        }

    def unreported(self) -> dict[str, Exhaustion]:
        return {k: e for k, e in self.record.exhausted.items() if not e.reported}

    def mark_reported(self, key: str) -> None:
        known = self.record.exhausted.get(key)
        if known is not None:
            self.record.exhausted[key] = known.model_copy(update={"reported": True})

    def conversations(self, agents: Iterable[str]) -> list[ConversationSpend]:
        """Each conversation's spend so far for `agents`: the partial results of a subtree,
        with the calls still in flight (held, their outcome not settled yet)."""
        wanted = set(agents)
        flying: dict[tuple[str, str], int] = {}
        for hold in self.record.holds.values():
            if hold.agent in wanted and hold.conversation_id:
                key = (hold.agent, hold.conversation_id)
                flying[key] = flying.get(key, 0) + 1
        out = []
        for agent in sorted(wanted):
            for conv, s in self.record.conversations.get(agent, {}).items():
                out.append(
                    ConversationSpend(
                        agent=agent,
                        conversation_id=conv,
                        calls=s.calls,
                        tokens=s.tokens,
                        usd=s.usd,
                        in_flight=flying.pop((agent, conv), 0),
                    )
                )
        out.extend(
            ConversationSpend(agent=a, conversation_id=c, calls=0, tokens=0, usd=0.0, in_flight=n)
            for (a, c), n in flying.items()
        )
        return out

    # --- helpers -------------------------------------------------------------------------

    def _charge(self, accounts: Iterable[str], amount: Spend) -> None:
        for key in accounts:
            now = self.spent(key)
            self.record.spent[key] = Spend(
                tokens=now.tokens + amount.tokens,
                usd=now.usd + amount.usd,
                calls=now.calls + amount.calls,
            )

    def _drop_hold(self, request_id: str) -> Hold | None:
        hold = self.record.holds.pop(request_id, None)
        if hold is not None:
            self._count_hold(hold, -1)
        return hold

    def _count_hold(self, hold: Hold, sign: int) -> None:
        for key in hold.accounts:
            now = self._held.get(key) or Spend()
            held = Spend(
                tokens=now.tokens + sign * hold.tokens,
                usd=now.usd + sign * hold.usd,
                calls=now.calls + sign,
            )
            if held.calls:
                self._held[key] = held
            else:  # none left: exactly zero, not a float sum's residue
                self._held.pop(key, None)

    def _itemise(self, agent: str, conversation_id: str, amount: Spend) -> None:
        if not conversation_id:
            return
        self.itemisation_changes += 1
        convs = self.record.conversations.setdefault(agent, {})
        now = convs.pop(conversation_id, None)  # re-inserted: the newest last
        self._itemised += now is None
        now = now or Spend()
        convs[conversation_id] = Spend(
            tokens=now.tokens + amount.tokens, usd=now.usd + amount.usd, calls=now.calls + 1
        )
        while len(convs) > CONVERSATIONS_PER_AGENT:
            del convs[next(iter(convs))]
            self._itemised -= 1
        while self._itemised > CONVERSATIONS_MAX:
            busiest = max(self.record.conversations.values(), key=len)
            del busiest[next(iter(busiest))]
            self._itemised -= 1


def _over(limit: Budget, base: Spend, needed: Spend) -> bool:
    """Whether `needed` on top of `base` passes either of the limit's bounds."""
    over_tokens = limit.tokens is not None and base.tokens + needed.tokens > limit.tokens
    over_usd = limit.usd is not None and base.usd + needed.usd > limit.usd + USD_EPSILON
    return over_tokens or over_usd
