"""The host's stand-in for an isolated agent, against real child processes (small Python
scripts in place of `services.agent.solo`, no NATS): OTP's stop (SIGTERM, then SIGKILL
after the shutdown timeout; brutal_kill at once) and an unasked exit reported as a crash
with its exit code and last error line."""

from __future__ import annotations

import asyncio
import sys

from beamline.config import AgentSpec, ModelChoice
from beamline.control import AgentState, StopOutcome
from beamline.guard import Addendum
from beamline.testing import wait_for
from services.agent.isolated import Launch, ProcessAgent

SPEC = AgentSpec(name="solo", role="r", models=(ModelChoice(provider="p", model="m"),))
READY = 'print(\'{"pid": 1, "beat": {"agent": "solo", "state": "idle"}}\', flush=True)'


def agent(script: str, exits: list[str] | None = None) -> ProcessAgent:
    """A started stand-in whose process runs `script` after reporting itself idle."""
    launch = Launch(
        "host-t", argv=(sys.executable, "-c", f"{script}\n{READY}\nimport time\ntime.sleep(60)")
    )

    def on_exit(_: ProcessAgent, exit: str) -> None:
        (exits if exits is not None else []).append(exit)

    proxy = ProcessAgent(SPEC, launch, generation=1, running=True, on_exit=on_exit)
    proxy.kick()
    return proxy


async def test_stop_is_sigterm_and_a_process_that_exits_on_it_shut_down() -> None:
    proxy = agent("")  # Python's default SIGTERM: the process ends at once
    await wait_for(lambda: proxy.state is AgentState.IDLE, timeout=10, what="its first report")
    pid = proxy.pid
    assert proxy.status()["pid"] == pid and proxy.status()["isolation"] == "process"
    assert await asyncio.wait_for(proxy.halt(5), 10) is StopOutcome.SHUTDOWN
    assert proxy.state is AgentState.STOPPED and not proxy.alive


async def test_a_process_ignoring_sigterm_is_killed_after_the_shutdown_timeout() -> None:
    exits: list[str] = []
    proxy = agent("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)", exits)
    await wait_for(lambda: proxy.state is AgentState.IDLE, timeout=10, what="its first report")
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await asyncio.wait_for(proxy.halt(0.3), 10) is StopOutcome.KILLED
    assert 0.3 <= loop.time() - began < 5 and not proxy.alive
    assert exits == []  # a stop the host asked for is no crash


async def test_brutal_kill_is_sigkill_at_once() -> None:
    proxy = agent("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)")
    await wait_for(lambda: proxy.state is AgentState.IDLE, timeout=10, what="its first report")
    assert await asyncio.wait_for(proxy.halt(None), 5) is StopOutcome.KILLED


async def test_an_unasked_exit_is_reported_as_a_crash_with_code_and_last_error_line() -> None:
    exits: list[str] = []
    script = "import os, sys\nsys.stderr.write('disk full\\n')\nsys.stderr.flush()\nos._exit(3)"
    proxy = agent(script, exits)
    await wait_for(lambda: exits, timeout=10, what="the crash report")
    assert exits == ["crash: agent process exited with code 3: disk full"]
    assert proxy.state is AgentState.DEAD and proxy.last_error == exits[0]
    assert not proxy.running and proxy.crashed_at is not None
    successor = proxy.successor(2)
    assert successor.generation == 2 and successor.on_exit is proxy.on_exit
    assert await proxy.halt(1) is StopOutcome.SHUTDOWN  # nothing left to stop
    assert exits == [exits[0]]


async def test_the_loop_guards_addendum_reaches_the_agents_own_process() -> None:
    addendum = Addendum(conversation_id="c1", text="Loop guard: you repeated yourself")
    assert Launch("host-t").env("solo", 2)["BEAMLINE_SOLO_ADDENDUM"] == ""
    # the process a host launches with it reads it back (as services.agent.solo does)
    script = (
        "import sys\nfrom services.agent.settings import SoloSettings\n"
        "got = SoloSettings().guard_addendum()\n"
        "print('ADDENDUM', got.conversation_id, got.text, file=sys.stderr)"
    )
    launch = Launch("host-t", argv=(sys.executable, "-c", script))
    proc = await asyncio.create_subprocess_exec(
        *launch.argv, env=launch.env("solo", 3, addendum), stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert "ADDENDUM c1 Loop guard: you repeated yourself" in err.decode().splitlines(), err
