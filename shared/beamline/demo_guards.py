"""The guards act of `beamline demo`: each guard acting on a scripted failure, with the
events that show it printed as they are published and the ids to trace.

- a provider failing: its breaker opens and the scout's calls fail over to the second
  provider, then fail back once a trial call succeeds;
- an overspending subtree: the `drafts` supervisor's budget runs out, the subtree is
  stopped before the call that would overspend, and its partial results are listed;
- a looping agent: corrected with an addendum to its system prompt, then escalated to a
  human (the demo answers as the human);
- a long conversation: summarised before it overflows its model's context window.

What fakellm answers is in infra/examples/fakellm-demo.yaml (the rules named scout-*,
drafter-*, fixer-*, archivist-*).
"""

from __future__ import annotations

import textwrap
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from beamline import budget_ops, client, escalation_ops, ops, subjects
from beamline.demo_supervision import print_events
from beamline.envelope import Envelope
from beamline.guard import Loop, OnTimeout
from beamline.polling import wait_for

SHOWN = {
    "breaker_opened": "gateway: breaker of {provider} opened",
    "breaker_half_opened": "gateway: breaker of {provider} half-open: the next call is a trial",
    "breaker_closed": "gateway: breaker of {provider} closed",
    "agent_failed_over": "{agent}: failed over {from} -> {provider} ({reason})",
    "agent_failed_back": "{agent}: failed back {from} -> {provider} ({reason})",
    "budget_exhausted": "supervisor: {child}'s budget is spent ({spent_usd} USD, "
    "{spent_tokens} tokens): stopping its subtree",
    "loop_detected": "loop guard: {agent} {what} (rung: {rung})",
    "guard_restarted": "supervisor: {child} restarted with an addendum to its system prompt",
    "agent_suspended": "supervisor: {child} suspended while a human is asked ({escalation})",
    "agent_resumed": "supervisor: {child} resumed, the human's advice in its addendum",
    "escalation_opened": "escalation {id} on bl.escalation.{agent}: {how_to_answer}",
    "escalation_closed": "escalation {id} closed: {outcome} (by {answered_by})",
    "context_summarised": "{agent}: {tokens_before} tokens of its {window}-token window: "
    "older turns summarised, the next request is {tokens_after}",
    "context_window_reset": "{agent}: a fresh window seeded from its {seed}",
}
SCOUT_PROMPTS = ("Scout the market for agent runtimes.", "Scout again, an hour later.")
DRAFTS = tuple(f"Draft section {i} of the launch post." for i in range(1, 7))


async def watch(nc: NATS) -> list[Subscription]:
    """Print each guard event worth seeing, as it is published."""

    def data(name: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        if name == "agent_resumed" and "child" not in fields:
            return None  # the agent's own (a breaker's), not the supervisor's
        if name == "loop_detected":
            loop = Loop.model_validate({k: v for k, v in fields.items() if k in Loop.model_fields})
            return {**fields, "what": loop.describe()}
        return fields

    return [
        await print_events(nc, subjects.EVENTS_ALL, SHOWN, data=data),
        await print_events(nc, subjects.ESCALATIONS_ALL, SHOWN),
    ]


async def run(nc: NATS) -> int:
    """Every scenario; the number that did not end as scripted."""
    subscriptions = await watch(nc)
    try:
        failed = await failover(nc)
        failed += await budget(nc)
        failed += await looping(nc)
        failed += await long_conversation(nc)
    finally:
        for sub in subscriptions:
            await sub.unsubscribe()
    return failed


async def failover(nc: NATS) -> int:
    print("\nA provider failing (fakellm-eu answers 503): the scout fails over, then back")
    first = await _ask(nc, "scouting", SCOUT_PROMPTS[0])

    async def trial_due() -> bool:  # after its breaker_reset_s, as the scout's host sees it
        row = await ops.admin(nc, "inspect", "scout")
        return bool(row.get("breakers", {}).get("fakellm-eu") == "half_open")

    await wait_for(trial_due, timeout=30, interval=0.1, what="fakellm-eu's breaker half-open")
    second = await _ask(nc, "scouting", SCOUT_PROMPTS[1])
    return int(first is None or second is None)


async def budget(nc: NATS) -> int:
    print("\nAn overspending subtree: the drafts team has a budget of 0.002 USD")
    answered: list[str] = []
    refused = None
    for prompt in DRAFTS:
        reply = await _ask(nc, "drafting", prompt, quiet_error=True)
        if reply is None:
            refused = prompt
            break
        answered.append(reply.conversation_id)
    if refused is None:
        print("   the budget was never spent: no subtree stopped")
        return 1
    account = (await budget_ops.show(nc, "drafts"))["accounts"]
    print(textwrap.indent(budget_ops.render(account), "   "))
    print(
        f"   partial results kept: {len(answered)} drafts answered before the stop; "
        f"each is in its journal: beamline trace {answered[0]}"
    )
    return 0


async def looping(nc: NATS) -> int:
    print("\nA looping agent: the fixer searches the same thing again and again")
    conversation = await client.submit(nc, subjects.task("fixing"), "Fix the flaky deploy.")
    print("→ fixing: Fix the flaky deploy.")

    async def opened() -> dict[str, Any] | None:
        found = await escalation_ops.list_escalations(nc, "fixer")
        return found[0] if found else None

    escalation = await wait_for(opened, timeout=60, interval=0.2, what="an escalation")
    advice = "check the runbook before searching again"
    print(
        f"   the human answers: beamline escalation answer {escalation['id']} --resume "
        f'--say "{advice}"'
    )
    await escalation_ops.answer(nc, escalation["id"], OnTimeout.RESUME, advice, by="demo")
    reply = await client.await_reply(nc, conversation, timeout=60)
    print(f"← fixing ({reply.sender}): {client.reply_text(reply)}   [{conversation}]")
    return int(reply.kind.value != "reply")


async def long_conversation(nc: NATS) -> int:
    print("\nA long conversation: the archivist reads six days of log into a 1,500-token window")
    reply = await _ask(nc, "archiving", "Read the incident log and tell me what it shows.")
    if reply is None:
        return 1
    print(
        "   every page it read is still in its journal and in ClickHouse: "
        f"beamline trace {reply.conversation_id}"
    )
    return 0


async def _ask(nc: NATS, role: str, prompt: str, quiet_error: bool = False) -> Envelope | None:
    """The reply, or None (printed) when the task ended in an error."""
    conversation = await client.submit(nc, subjects.task(role), prompt)
    print(f"→ {role}: {prompt}")
    reply = await client.await_reply(nc, conversation, timeout=60)
    if reply.kind.value == "reply":
        print(f"← {role} ({reply.sender}): {client.reply_text(reply)}   [{conversation}]")
        return reply
    print(f"← {role}: refused: {client.reply_text(reply)}   [{conversation}]")
    return None
