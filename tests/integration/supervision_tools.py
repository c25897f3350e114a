"""Tools that misbehave on purpose, for the supervision scenarios. State is per host
process, like a real bug that depends on what a process has seen."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from beamline.tools import Crash, tool

_crashed: set[str] = set()
_hung: set[str] = set()


@tool
def crash_once(key: str) -> str:
    """Crash the agent the first time a key is seen on this host; succeed after."""
    if key not in _crashed:
        _crashed.add(key)
        raise Crash(f"crash_once({key!r})")
    return f"survived {key}"


@tool
def crash_always(key: str) -> str:
    """Crash the agent every time."""
    raise Crash(f"crash_always({key!r})")


@tool
async def hang_once(key: str) -> str:
    """Never return the first time a key is seen on this host (a hung agent)."""
    if key not in _hung:
        _hung.add(key)
        await asyncio.sleep(3600)
    return f"awake {key}"


@tool
async def slow(seconds: float) -> str:
    """Take a while, as a long tool call does."""
    await asyncio.sleep(seconds)
    return f"slept {seconds}"


@tool
def exit_once(key: str) -> str:
    """End the whole process (`os._exit(1)`, no cleanup, like a segfault) the first time a
    key is seen on this machine; succeed after. The mark outlives the process it killed."""
    mark = Path(tempfile.gettempdir()) / f"beamline-exit-once-{key}"
    if not mark.exists():
        mark.touch()
        os._exit(1)
    return f"survived {key}"
