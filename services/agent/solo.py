"""`python -m services.agent.solo`: one agent in an OS process of its own
(`isolation: process`), started by the agent host the supervisor placed it on.

It consumes the agent's own mailbox (the pinned consumer the supervisor assigned to its
host) and runs one `Agent`, with the runner and journal every host uses: a new process
resumes from the journal and mailbox like a restarted in-host agent. It reports to its host
on the pipe (`pipe.Report`), finishes the message in hand on SIGTERM, exits non-zero when
the agent's code raises, and dies with its host (no orphan keeps consuming the mailbox).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path
from typing import BinaryIO

from beamline import bus, config, nats_auth, streams
from beamline.errors import ConfigError
from beamline.nats_auth import Role
from beamline.service import crash_on_error, run
from beamline.settings import MeshSettings
from services.agent.mailbox import Mailbox, MailboxConsumer
from services.agent.pipe import Report, holding
from services.agent.runner import Agent, HostContext
from services.agent.settings import AgentHostSettings, SoloSettings

log = logging.getLogger("beamline.agent.solo")

# On SIGTERM the message in hand is finished however long it takes: the host's SIGKILL,
# after the child's shutdown timeout, is what bounds it (OTP's shutdown semantics).
FINISH_IN_HAND_S = 86_400.0
PR_SET_PDEATHSIG = 1
OOM_SCORE_ADJ = 1000  # the most: this process goes first when memory runs out
PARENT_POLL_S = 0.5
CRASH_EXIT_CODE = 1


class Pipe:
    """The line to the host: the original stdout. fd 1 then points at stderr, so whatever
    else writes to stdout (a tool's print, a C library) cannot corrupt the reports."""

    def __init__(self) -> None:
        self._out: BinaryIO = os.fdopen(os.dup(1), "wb", buffering=0)
        os.dup2(2, 1)

    def send(self, report: Report) -> None:
        try:
            self._out.write(report.line())
        except BrokenPipeError:  # the host is gone: so is the reason to run
            os._exit(CRASH_EXIT_CODE)


def die_with_parent(parent_pid: int) -> None:
    """On Linux the kernel SIGKILLs this process when its host dies, kill -9 included, so
    no orphan keeps consuming the agent's mailbox; `watch_parent` covers other systems."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("PR_SET_PDEATHSIG refused; polling the parent instead")
    if os.getppid() != parent_pid:  # the host died before the kernel was told
        os._exit(CRASH_EXIT_CODE)


def sacrifice_first() -> None:
    """Ask the kernel's OOM killer to pick this process before its host (as browsers do
    for their renderer processes): a memory blow-up in the agent's code then ends this
    agent, not the host and every agent in it. Raising one's own score needs no privilege."""
    try:
        Path("/proc/self/oom_score_adj").write_text(f"{OOM_SCORE_ADJ}\n")
    except OSError:  # not Linux, or /proc read-only: the OOM killer still prefers the biggest
        log.info("oom_score_adj not set", exc_info=True)


async def watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            log.error("host process gone; exiting", extra={"parent_pid": parent_pid})
            os._exit(CRASH_EXIT_CODE)
        await asyncio.sleep(PARENT_POLL_S)


class Reporter:
    """The agent's reports. The task in hand travels whole once, then by id: a large task
    is not re-sent (and re-parsed by the host) at every beat; the pipe loses nothing."""

    def __init__(self, agent: Agent, pipe: Pipe) -> None:
        self.agent, self.pipe = agent, pipe
        self._sent: str | None = None

    def send(self) -> None:
        current, queued = holding(self.agent.queue)
        current_id = current.id if current is not None else None
        whole = current if current_id != self._sent else None
        self._sent = current_id
        self.pipe.send(
            Report(
                pid=os.getpid(),
                beat=self.agent.beat(),
                current_id=current_id,
                current=whole,
                queued=queued,
            )
        )


async def beat(reporter: Reporter, interval_s: float) -> None:
    while True:
        reporter.send()
        await asyncio.sleep(interval_s)


async def main(stop: asyncio.Event) -> int:
    solo = SoloSettings()  # type: ignore[call-arg]  # every field comes from the environment
    mesh, settings = MeshSettings(), AgentHostSettings()
    die_with_parent(solo.parent_pid)
    sacrifice_first()
    pipe = Pipe()
    deployment = config.load(mesh.config)
    deployment.check_tools()
    spec = deployment.agent(solo.agent)
    if spec is None or solo.agent not in deployment.isolated_agents():
        raise ConfigError(
            f"{mesh.config}: no agent {solo.agent!r} with isolation: process; "
            "a host starts this module only for such agents"
        )
    nc = await bus.connect(mesh.nats_url, f"agent:{settings.host_id}:{solo.agent}")
    js = nc.jetstream()
    await streams.require_layout(js, nats_auth.USES[Role.AGENT], mesh.layout_wait_s)
    ctx = HostContext.open(nc, settings)
    died: list[str] = []

    def on_exit(agent: Agent, exit: str) -> None:
        died.append(exit)
        pipe.send(Report(pid=os.getpid(), exit=exit))
        stop.set()

    # every state change is reported at once, not only at the next beat: a tool that
    # blocks the loop right after `waiting-on-tool` must leave that state with its host
    agent = Agent(
        spec, ctx, generation=solo.generation, on_exit=on_exit, addendum=solo.guard_addendum()
    )
    reporter = Reporter(agent, pipe)
    agent.on_state = lambda _: reporter.send()
    mailbox = MailboxConsumer(
        js,
        Mailbox.pinned(settings.host_id, agent.name),
        lambda name: agent if name == agent.name else None,
        settings,
        mesh.max_message_bytes,
    )
    await mailbox.open()
    await mailbox.start()
    loops = [
        asyncio.create_task(beat(reporter, settings.heartbeat_s), name="beat"),
        asyncio.create_task(watch_parent(solo.parent_pid), name="parent"),
    ]
    for loop in loops:
        loop.add_done_callback(crash_on_error)
    log.info(
        "isolated agent ready",
        extra={"agent": agent.name, "generation": solo.generation, "host": settings.host_id},
    )
    await stop.wait()

    await mailbox.stop_taking()
    if not died:
        await agent.halt(FINISH_IN_HAND_S)
    for loop in loops:
        loop.cancel()
    reporter.send()
    await ctx.close()
    # close, not drain: what it did not finish stays unacknowledged for the next incarnation
    await nc.close()
    return CRASH_EXIT_CODE if died else 0


if __name__ == "__main__":
    run("agent-solo", main, MeshSettings().log_level)
