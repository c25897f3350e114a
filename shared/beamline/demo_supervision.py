"""The supervision half of `beamline demo`: an agent killed mid-task, then the whole host it
runs on killed with kill -9. Each time the supervisor's decisions are printed as they are
recorded, and the conversation finishes from its journal: the LLM call made before the
kill is not made again (fakellm counts its calls)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from beamline import client, ops, subjects
from beamline.polling import wait_for
from beamline.runtime import Mesh

SHOWN = {
    "child_exited": "{child} exited under {supervisor}: {exit}",
    "child_restarted": "{supervisor} restarted {start} ({reason}; {restarts}/{intensity} restarts in {period}s)",
    "host_lost": "host {host} lost: re-homing {n_agents} agents",
    "agent_rehomed": "{agent} re-homed: {from_host} -> {to_host}",
    "children_rehomed": "{n} agents re-homed: {from_host} -> {host}",
    "operator_command": "operator: {command} {child}",
}
SLOW = "take your time"  # fakellm-demo.yaml answers these slowly: time to kill something


EventData = Callable[[str, dict[str, Any]], dict[str, Any] | None]


async def print_events(
    nc: NATS, subject: str, shown: dict[str, str], prefix: str = "", data: EventData | None = None
) -> Subscription:
    """Print each event on `subject` that `shown` has a line for, as it is published: the
    line formatted with the event's data (through `data(name, data)` when given; None skips
    the event)."""

    async def show(msg: Msg) -> None:
        payload = json.loads(msg.data)["payload"]
        name, fields = payload["name"], payload["data"]
        line = shown.get(name)
        if line is None:
            return
        if data is not None:
            fields = data(name, fields)
        if fields is not None:
            print(f"   {prefix}{line.format_map(Lenient(fields))}")

    return await nc.subscribe(subject, cb=show)


async def watch_decisions(nc: NATS) -> Subscription:
    """Print each supervisor decision worth seeing, as it is published."""
    return await print_events(nc, "bl.events.supervisor.>", SHOWN, prefix="supervisor: ")


async def run(mesh: Mesh, nc: NATS) -> int:
    """Both acts; the number of tasks that did not end in a reply."""
    fakellm = f"http://127.0.0.1:{mesh.options.fakellm_port}"
    decisions = await watch_decisions(nc)
    try:
        failed = await _act(
            nc,
            fakellm,
            "An agent killed mid-task (beamline kill researcher)",
            f"Please {SLOW}: how does rest_for_one restart siblings?",
            lambda host: ops.admin(nc, "kill", "researcher"),
        )

        async def kill_host(host: str) -> None:
            print(f"   kill -9 of host {host}, the whole process")
            mesh.process(f"agent-{host}").kill()

        failed += await _act(
            nc,
            fakellm,
            "A whole host killed (kill -9 of the researcher's host)",
            f"Please {SLOW}: what happens when a host dies?",
            kill_host,
        )
    finally:
        await decisions.unsubscribe()
    return failed


async def _act(
    nc: NATS,
    fakellm: str,
    title: str,
    prompt: str,
    strike: Callable[[str], Awaitable[Any]],
) -> int:
    print(f"\n{title}")
    before = await _calls(fakellm)
    conversation = await client.submit(nc, subjects.task("research"), prompt)
    print(f"→ research: {prompt}")
    row = await wait_for(
        lambda: _waiting_on_llm(nc), timeout=30, interval=0.05, what="researcher mid-task"
    )
    print(f"   researcher is {row['state']} on {row['host']} (step {row.get('step')})")
    await strike(row["host"])
    reply = await client.await_reply(nc, conversation, timeout=60)
    print(f"← research ({reply.sender}): {client.reply_text(reply)}")
    after = await _calls(fakellm)
    searches = after["researcher-searches"] - before["researcher-searches"] - 1
    answers = after["researcher-answers-slowly"] - before["researcher-answers-slowly"]
    print(
        f"   resumed from its journal: {searches} LLM calls repeated (fakellm answered the "
        f"search once and the answer in flight {answers} time(s): the gateway remembers)"
    )
    print(f"   beamline trace {conversation}")
    return int(reply.kind.value != "reply" or searches != 0)


async def _waiting_on_llm(nc: NATS) -> dict[str, Any] | None:
    row: dict[str, Any] = await ops.admin(nc, "inspect", "researcher")
    return row if row.get("state") == "waiting-on-llm" else None


async def _calls(fakellm: str) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=5) as http:
        calls = (await http.get(f"{fakellm}/_fakellm/calls")).json()
    counts = {"researcher-searches": 0, "researcher-answers-slowly": 0}
    for call in calls:
        counts[call["rule"]] = counts.get(call["rule"], 0) + 1
    return counts


class Lenient(dict[str, Any]):
    """An event's data for str.format_map: a field the event lacks shows as "?"."""

    def __missing__(self, key: str) -> str:
        return "?"
