"""The pipe from an isolated agent's process to its host: one JSON `Report` per line.

The child writes on its original stdout and points its own fd 1 at stderr before any agent
code runs, so a tool's stray `print` (or a C library's) lands in the log instead of
corrupting the pipe. The host reads every line; a line that is no report is logged, never
trusted. The child's stderr carries its structured logs; the host forwards them and keeps
the last error line for the crash report.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, ValidationError

from beamline.control import AgentBeat
from beamline.envelope import Envelope
from services.agent.runner import Delivery

LAST_ERROR_CHARS = 300
QUEUED_SHOWN = 100


class Report(BaseModel):
    """What the child says about its agent: a beat (its state now, the message it holds),
    or, once, why the agent died (its code raised) just before the process exits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pid: int
    beat: AgentBeat | None = None
    current_id: str | None = None  # the id of the task in hand
    current: Envelope | None = None  # that task whole, for `inspect`: only when it changes
    queued: tuple[str, ...] = ()  # ids of the tasks waiting behind it (QUEUED_SHOWN at most)
    exit: str | None = None  # "crash: ..." when the agent's code raised

    def line(self) -> bytes:
        return self.model_dump_json().encode() + b"\n"


def holding(queue: Sequence[Delivery]) -> tuple[Envelope | None, tuple[str, ...]]:
    """An agent's queue as `inspect` shows it: the task in hand, the ids behind it."""
    held = list(queue)
    current = held[0].task if held else None
    return current, tuple(d.task.id for d in held[1 : QUEUED_SHOWN + 1])


def read_report(line: bytes) -> Report | None:
    """The report on one line of the pipe, or None when the line is not one."""
    try:
        return Report.model_validate_json(line)
    except ValidationError:
        return None


def describe_exit(returncode: int, stated: str | None, last_error: str | None) -> str:
    """The crash reason the supervisor gets for a process that exited unasked. An agent
    never ends by itself (it ends when stopped), so any unasked exit is a crash, even 0."""
    if stated:
        return stated
    if returncode < 0:
        try:
            how = f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exited with code {returncode}"
    tail = f": {last_error}" if last_error else ""
    return f"crash: agent process {how}{tail}"


def error_line(line: str) -> str | None:
    """The part of a child's stderr line worth quoting in a crash report: an error log's
    message (with its exception's last line), or any line that is not a structured log
    (an interpreter's dying words: 'Fatal Python error', 'Segmentation fault'); else None."""
    text = line.strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return text[:LAST_ERROR_CHARS]
    if not isinstance(record, dict):
        return text[:LAST_ERROR_CHARS]
    if record.get("level") not in ("error", "critical"):
        return None
    exc = str(record.get("exc") or "").strip().splitlines()
    message = str(record.get("msg", ""))
    return (f"{message}: {exc[-1]}" if exc else message)[:LAST_ERROR_CHARS]
