"""The host's side of a process-isolated agent (`isolation: process`): a stand-in that
starts the agent's own OS process (`python -m services.agent.solo`), shows it like any
agent, and stops it the OTP way.

The process consumes the agent's own mailbox and runs one `Agent` (the same runner and
journal as in a host), so whatever its code does (a segfault, `os._exit`, a memory
blow-up, a tool that blocks its event loop) ends that process only. Its state arrives as
`pipe.Report` lines; a stop is SIGTERM, then SIGKILL once the child's shutdown timeout
passes (`brutal_kill`: SIGKILL at once); an exit the host did not ask for is a crash,
reported to the supervisor at once with the exit code or signal and the last error line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from beamline.config import AgentSpec
from beamline.control import AgentBeat, StopOutcome
from beamline.control import AgentState as State
from beamline.envelope import Envelope
from beamline.errors import CallerError, Reason
from beamline.guard import Addendum
from services.agent.pipe import Report, describe_exit, error_line, read_report
from services.agent.runner import Delivery, StateClock

log = logging.getLogger("beamline.agent.isolated")

SOLO_MODULE = "services.agent.solo"
PIPE_LINE_LIMIT = 16 * 1024 * 1024  # a report carries the task in hand, up to its max size
WORKING = frozenset({State.STARTING, State.RUNNING, State.WAITING_ON_LLM, State.WAITING_ON_TOOL})


@dataclass(frozen=True)
class Launch:
    """How a host starts its isolated agents: this interpreter, the host's id (the child
    consumes the mailbox assigned to this host) and the host's environment."""

    host_id: str
    argv: tuple[str, ...] = (sys.executable, "-m", SOLO_MODULE)

    def env(self, agent: str, generation: int, addendum: Addendum | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "BEAMLINE_AGENT_HOST_ID": self.host_id,
            "BEAMLINE_SOLO_AGENT": agent,
            "BEAMLINE_SOLO_GENERATION": str(generation),
            "BEAMLINE_SOLO_PARENT_PID": str(os.getpid()),
            "BEAMLINE_SOLO_ADDENDUM": addendum.model_dump_json() if addendum else "",
        }


ExitReport = Callable[["ProcessAgent", str], None]


@dataclass(eq=False)
class ProcessAgent(StateClock):
    """One incarnation of an isolated agent, as its host sees it: between the supervisor's
    start and stop, an OS process. Counts of earlier incarnations carry over, like an
    in-host agent's; the mailbox is the process's own, so `queue` stays empty here."""

    spec: AgentSpec
    launch: Launch
    generation: int = 0
    running: bool = False
    on_exit: ExitReport | None = None
    last_error: str | None = None
    crashed_at: float | None = None  # monotonic, when this incarnation died
    queue: deque[Delivery] = field(default_factory=deque)
    report: Report | None = None  # the latest from its process
    earlier: tuple[int, int, int] = (0, 0, 0)  # processed, failed, tokens before this one
    addendum: Addendum | None = None  # the loop guard's, handed to its process
    _state: State = State.STOPPED
    _changed_at: float = field(default_factory=time.monotonic)
    _reported_at: float = 0.0
    _proc: asyncio.subprocess.Process | None = None
    _watcher: asyncio.Task[None] | None = None
    _stopping: bool = False
    _stated_exit: str | None = None
    _current: Envelope | None = None  # the task in hand, sent whole once
    _last_error_line: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def busy(self) -> bool:
        """Working on a message (or starting): what heartbeats show and hung checks watch."""
        return self.alive and self.state in WORKING

    @property
    def current(self) -> Envelope | None:
        held, report = self._current, self.report
        return held if held is not None and report and held.id == report.current_id else None

    @property
    def queued(self) -> tuple[str, ...]:
        return self.report.queued if self.report is not None else ()

    def _counts(self) -> tuple[int, int, int]:
        beat = self.report.beat if self.report is not None else None
        now = (beat.processed, beat.failed, beat.tokens) if beat is not None else (0, 0, 0)
        return (
            self.earlier[0] + now[0],
            self.earlier[1] + now[1],
            self.earlier[2] + now[2],
        )

    # --- what the host does with any agent ---------------------------------------------

    def deliver(self, delivery: Delivery) -> None:
        raise RuntimeError(
            f"agent {self.name!r} runs in its own process, which consumes its mailbox; a "
            "host mailbox must skip it (it belongs in the host's pinned names)"
        )

    def kick(self) -> None:
        """Start the process, once per incarnation, when the supervisor has started it."""
        if self.running and self._watcher is None:
            self.state = State.STARTING
            self._watcher = asyncio.create_task(self._run(), name=f"process:{self.name}")

    def successor(self, generation: int) -> ProcessAgent:
        """The next incarnation: a new process, which resumes from the journal and mailbox."""
        if self.alive:
            raise CallerError(
                f"agent {self.name!r} still runs as pid {self.pid}; stop it first",
                Reason.INVALID_SCHEMA,
            )
        return ProcessAgent(
            self.spec,
            self.launch,
            generation=generation,
            on_exit=self.on_exit,
            last_error=self.last_error,
            earlier=self._counts(),
            _state=State.STARTING,
        )

    def beat(self) -> AgentBeat:
        processed, failed, tokens = self._counts()
        child = self.report.beat if self.report is not None else None
        now = time.monotonic()
        if child is None or not self.alive:
            return AgentBeat(
                agent=self.name,
                state=self.state,
                generation=self.generation,
                processed=processed,
                failed=failed,
                tokens=tokens,
                progress_age_s=round(now - self._changed_at, 3),
                last_error=self.last_error,
            )
        # a process that stopped reporting (a tool blocking its loop) ages like a hung agent
        return child.model_copy(
            update={
                "generation": self.generation,
                "processed": processed,
                "failed": failed,
                "tokens": tokens,
                "progress_age_s": round(child.progress_age_s + now - self._reported_at, 3),
                "last_error": child.last_error or self.last_error,
            }
        )

    def status(self) -> dict[str, Any]:
        return {
            "role": self.spec.role,
            **self.beat().model_dump(),
            "isolation": "process",
            "pid": self.pid if self.alive else None,
        }

    async def halt(self, timeout: float | None) -> StopOutcome:
        """The supervisor's stop: SIGTERM, and SIGKILL if the process has not exited within
        `timeout` (None: brutal_kill, SIGKILL at once). The process finishes the message in
        hand on SIGTERM; what it leaves unacknowledged waits for the next incarnation."""
        self.running = False
        self._stopping = True
        outcome = StopOutcome.SHUTDOWN
        proc = self._proc
        if proc is not None and proc.returncode is None:
            outcome = await _terminate(proc, timeout)
            log.info(
                "agent process stopped",
                extra={"agent": self.name, "pid": proc.pid, "outcome": outcome.value},
            )
        if self._watcher is not None:
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self.state is not State.DEAD:
            self.state = State.STOPPED
        return outcome

    async def stop(self, timeout: float) -> None:
        """The host's own graceful stop: its isolated agents go first, never orphaned."""
        await self.halt(timeout)

    # --- the process ---------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.launch.argv,
                env=self.launch.env(self.name, self.generation, self.addendum),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=PIPE_LINE_LIMIT,
                # its own session: a terminal's Ctrl-C reaches the host, which stops it
                start_new_session=True,
            )
        except OSError as exc:
            self._die(f"crash: agent process did not start: {exc}")
            return
        self._proc = proc
        log.info(
            "agent process started",
            extra={"agent": self.name, "pid": proc.pid, "generation": self.generation},
        )
        if self._stopping:  # stopped while it was being spawned
            proc.kill()
        assert proc.stdout is not None and proc.stderr is not None
        await asyncio.gather(self._read_reports(proc.stdout), self._forward_logs(proc.stderr))
        code = await proc.wait()
        if self._stopping:
            return
        self._die(describe_exit(code, self._stated_exit, self._last_error_line))

    async def _read_reports(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            report = read_report(line)
            if report is None:
                log.warning(
                    "not a report on an agent process's pipe; ignored",
                    extra={"agent": self.name, "line": line[:200].decode(errors="replace")},
                )
                continue
            if report.exit is not None:
                self._stated_exit = report.exit
            if report.current is not None:
                self._current = report.current
            if report.beat is not None:
                self.report, self._reported_at = report, time.monotonic()
                self._state = report.beat.state

    async def _forward_logs(self, stream: asyncio.StreamReader) -> None:
        """The child's logs join the host's (one JSON object per line); its last error
        line is kept for the crash report."""
        out = sys.stderr.buffer
        while line := await stream.readline():
            out.write(line if line.endswith(b"\n") else line + b"\n")
            out.flush()
            quoted = error_line(line.decode(errors="replace"))
            if quoted is not None:
                self._last_error_line = quoted

    def _die(self, exit: str) -> None:
        self.crashed_at = time.monotonic()
        self.running = False
        self.state = State.DEAD
        self.last_error = exit
        log.error(
            "agent process exited unasked; reporting a crash",
            extra={"agent": self.name, "pid": self.pid, "exit": exit},
        )
        if self.on_exit is not None:
            self.on_exit(self, exit)


async def _terminate(proc: asyncio.subprocess.Process, timeout: float | None) -> StopOutcome:
    try:
        if timeout is None:
            proc.kill()
            await proc.wait()
            return StopOutcome.KILLED
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
            return StopOutcome.SHUTDOWN
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return StopOutcome.KILLED
    except ProcessLookupError:  # it exited between the check and the signal
        await proc.wait()
        return StopOutcome.SHUTDOWN
