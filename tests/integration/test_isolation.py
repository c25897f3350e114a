"""Process isolation on a real mesh (nats-server, fakellm over HTTP, gateway, recorder,
supervisor, agent hosts as processes): an `isolation: process` agent runs in an OS process
of its own, started by its host; whatever kills that process kills only that agent, which
its supervisor restarts and which resumes its conversation repeating no LLM call."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from beamline import subjects
from beamline.client import await_reply, reply_text, submit
from beamline.testing import wait_for
from tests.integration.conftest import MeshFactory, MeshHandle
from tests.integration.test_supervision import FAST, _host_seen, admin, events, named

HERE = Path(__file__).parent
TREE = HERE / "isolated.yaml"
SCRIPT = HERE / "isolated-script.yaml"
SOLO_MODULE = b"services.agent.solo"


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process; None once it is gone (a zombie is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else (fields[0], int(fields[1]))


@pytest.fixture
def reap() -> Iterator[list[int]]:
    """Agent processes a test saw: SIGKILLed at the end if still there, even on failure."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            if SOLO_MODULE in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


async def row(mesh: MeshHandle, agent: str) -> dict[str, Any]:
    rows = (await admin(mesh, "ps"))["result"]
    found: dict[str, Any] = next(r for r in rows if r["agent"] == agent)
    return found


async def solo_pid(mesh: MeshHandle, reap: list[int], not_pid: int | None = None) -> int:
    """The pid of solo's process once it is up and idle (and not `not_pid`)."""

    async def up() -> int | None:
        r = await row(mesh, "solo")
        pid = r.get("pid")
        return pid if r["state"] == "idle" and pid and pid != not_pid else None

    pid: int = await wait_for(up, timeout=30, what="solo's own process to be up")
    reap.append(pid)
    return pid


@pytest.fixture
async def isolated(
    start_mesh: MeshFactory, reap: list[int], tmp_path: Path
) -> tuple[MeshHandle, int]:
    """The mesh running isolated.yaml, and the pid of solo's first process once it is up."""
    env = {**FAST, "BEAMLINE_TEST_MARKS": str(tmp_path)}  # the tools' marks, cleaned up
    mesh: MeshHandle = await start_mesh(config=TREE, script=SCRIPT, env=env)
    return mesh, await solo_pid(mesh, reap)


async def ask(mesh: MeshHandle, agent: str, text: str, timeout: float = 30) -> str:
    conversation = await submit(mesh.nc, subjects.inbox(agent), text)
    return reply_text(await await_reply(mesh.nc, conversation, timeout=timeout))


async def rules(mesh: MeshHandle) -> list[str]:
    return [c["rule"] for c in await mesh.fakellm_calls()]


async def counts(mesh: MeshHandle, *names: str) -> list[int]:
    """How often fakellm answered by each rule: 1 each means no LLM call was repeated."""
    seen = await rules(mesh)
    return [seen.count(name) for name in names]


async def called(mesh: MeshHandle, rule: str) -> None:
    """Until fakellm has answered by `rule` (the agent now runs the tool it asked for)."""

    async def seen() -> bool:
        return rule in await rules(mesh)

    await wait_for(seen, timeout=20, what=f"fakellm to answer by {rule}")


async def test_an_isolated_agent_answers_from_its_own_process_and_shows_in_ps(
    isolated: tuple[MeshHandle, int], reap: list[int]
) -> None:
    mesh, pid = isolated
    host_pid = mesh.mesh.process("agent").popen.pid
    stat = proc_stat(pid)
    assert pid != host_pid and stat is not None and stat[1] == host_pid  # the host's child

    assert await ask(mesh, "solo", "hello") == "echo: hello"

    async def counted() -> dict[str, Any] | None:  # acked after the reply, reported after that
        solo = await row(mesh, "solo")
        return solo if solo["processed"] == 1 else None

    solo = await wait_for(counted, timeout=5, what="solo's report of the processed task")
    steady = await row(mesh, "steady")
    assert solo["isolation"] == "process" and solo["pid"] == pid and solo["host"] == "host-a"
    assert solo["generation"] == 1 and solo["tokens"] > 0
    assert steady["isolation"] == "task" and steady.get("pid") is None
    tree = (await admin(mesh, "tree"))["result"]
    assert {c["agent"]: c["isolation"] for c in tree["children"]} == {
        "steady": "task",
        "solo": "process",
    }

    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "beamline"),
        "ps",
        env={**os.environ, **mesh.mesh.env()},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    header, *lines = out.decode().splitlines()
    assert header.split()[-1] == "PID"
    assert any(line.split()[0] == "solo" and line.split()[-1] == str(pid) for line in lines)
    assert any(line.split()[0] == "steady" and line.split()[-1] == "-" for line in lines)

    # a host stopping gracefully stops its agents' processes first: none is left behind
    assert mesh.mesh.process("agent").stop(timeout=15) == 0
    assert proc_stat(pid) is None


async def test_a_tool_that_exits_its_process_crashes_only_that_agent(
    isolated: tuple[MeshHandle, int], reap: list[int]
) -> None:
    mesh, first = isolated
    host = mesh.mesh.process("agent")
    key = f"exit-{uuid.uuid4().hex[:8]}"

    assert await ask(mesh, "solo", key) == f"solo: survived {key}"
    evs = await events(mesh)
    [exited] = named(evs, "child_exited", "solo")
    assert exited["exit"].startswith("crash: agent process exited with code 1")
    [restarted] = named(evs, "child_restarted", "solo")
    assert restarted["terminate"] == [] and restarted["start"] == ["solo"]
    # the LLM answer journaled before os._exit is not asked for again
    assert await counts(mesh, "solo-exits", "solo-survives") == [1, 1]

    # the host and its other agents never noticed
    assert host.alive(), host.logs()[-2000:]
    assert await ask(mesh, "steady", "still here") == "echo: still here"
    assert (await row(mesh, "steady"))["generation"] == 1
    second = await solo_pid(mesh, reap, not_pid=first)
    assert proc_stat(first) is None and (await row(mesh, "solo"))["restarts"] == 1
    assert second != first


async def test_a_tool_blocking_its_process_is_killed_as_hung_and_the_host_answers_meanwhile(
    isolated: tuple[MeshHandle, int], reap: list[int]
) -> None:  # the supervisor kills after 4 s without progress
    mesh, first = isolated
    key = f"block-{uuid.uuid4().hex[:8]}"
    conversation = await submit(mesh.nc, subjects.inbox("solo"), key)
    await called(mesh, "solo-blocks")
    assert await ask(mesh, "steady", "not blocked") == "echo: not blocked"
    # inspect shows what the frozen process last reported: the task in hand, its steps
    detail = (await admin(mesh, "inspect", "solo"))["result"]
    assert detail["state"] == "waiting-on-tool" and detail["pid"] == first
    assert detail["current"]["conversation_id"] == conversation
    assert [s["kind"] for s in detail["steps"]] == ["task", "llm_response"]
    reply = await await_reply(mesh.nc, conversation, timeout=40)
    assert reply_text(reply) == f"solo: unblocked {key}"
    [exited] = named(await events(mesh), "child_exited", "solo")
    assert exited["exit"].startswith("hung: no progress for")
    assert proc_stat(first) is None
    assert await counts(mesh, "solo-blocks", "solo-unblocked") == [1, 1]


async def test_a_sigkilled_agent_process_is_a_crash_and_its_successor_answers(
    isolated: tuple[MeshHandle, int], reap: list[int]
) -> None:
    mesh, first = isolated
    os.kill(first, signal.SIGKILL)

    async def restarted() -> bool:
        return bool(named(await events(mesh), "child_restarted", "solo"))

    await wait_for(restarted, timeout=20, what="solo to be restarted")
    [exited] = named(await events(mesh), "child_exited", "solo")
    assert exited["exit"] == "crash: agent process killed by signal SIGKILL"
    second = await solo_pid(mesh, reap, not_pid=first)
    assert await ask(mesh, "solo", "again") == "echo: again"
    assert (await row(mesh, "solo"))["pid"] == second


async def test_stop_is_sigterm_then_sigkill_after_the_shutdown_timeout(
    isolated: tuple[MeshHandle, int], reap: list[int]
) -> None:
    mesh, idle = isolated
    await admin(mesh, "restart", "solo")  # idle: exits on SIGTERM within its 0.5 s
    [stopped] = named(await events(mesh), "child_stopped", "solo")
    assert stopped["outcome"] == "shutdown" and proc_stat(idle) is None

    busy = await solo_pid(mesh, reap, not_pid=idle)
    conversation = await submit(mesh.nc, subjects.inbox("solo"), "nap-1")
    await called(mesh, "solo-naps")  # solo is inside its slow tool
    await admin(mesh, "restart", "solo")  # the 2 s tool outlasts the 0.5 s shutdown
    outcomes = [e["outcome"] for e in named(await events(mesh), "child_stopped", "solo")]
    assert outcomes == ["shutdown", "killed"] and proc_stat(busy) is None
    # the next incarnation takes the task up again: the tool reruns (its result was never
    # journaled), the LLM call before it does not
    reply = await await_reply(mesh.nc, conversation, timeout=30)
    assert reply_text(reply) == "solo: slept 2.0"
    assert await counts(mesh, "solo-naps", "solo-wakes") == [1, 1]


async def test_a_killed_host_leaves_no_orphan_and_its_isolated_agent_is_rehomed(
    isolated: tuple[MeshHandle, int], reap: list[int]
) -> None:
    mesh, first = isolated
    host_b = mesh.mesh.spawn("agent-b", "services.agent", {"BEAMLINE_AGENT_HOST_ID": "host-b"})
    await wait_for(lambda: _host_seen(mesh, "host-b"), timeout=20, what="host-b to join")
    conversation = await submit(mesh.nc, subjects.inbox("solo"), "nap-2")
    await called(mesh, "solo-naps")  # solo is inside its slow tool
    mesh.mesh.process("agent").kill()  # kill -9 host-a, mid-task
    await wait_for(lambda: proc_stat(first) is None, timeout=5, what="solo's process to die")

    reply = await await_reply(mesh.nc, conversation, timeout=30)
    assert reply_text(reply) == "solo: slept 2.0"
    [moved] = named(await events(mesh), "agent_rehomed", "solo")
    assert moved["from_host"] == "host-a" and moved["to_host"] == "host-b"
    assert await counts(mesh, "solo-naps", "solo-wakes") == [1, 1]
    second = await solo_pid(mesh, reap, not_pid=first)
    assert (proc_stat(second) or ("", 0))[1] == host_b.popen.pid
    assert (await row(mesh, "solo"))["host"] == "host-b"
