"""Tools that misbehave on purpose, for the supervision scenarios. State is per host
process, like a real bug that depends on what a process has seen."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
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


def _first_time(tool: str, key: str) -> bool:
    """Whether `tool` sees `key` for the first time: a mark in a file (under the test's
    BEAMLINE_TEST_MARKS directory) outlives the process the tool kills or blocks."""
    marks = Path(os.environ.get("BEAMLINE_TEST_MARKS") or tempfile.gettempdir())
    mark = marks / f"beamline-{tool}-{key}"
    if mark.exists():
        return False
    mark.touch()
    return True


@tool
def exit_once(key: str) -> str:
    """End the whole process (`os._exit(1)`, no cleanup, like a segfault) the first time a
    key is seen; succeed after."""
    if _first_time("exit-once", key):
        os._exit(1)
    return f"survived {key}"


@tool
async def block_once(key: str) -> str:
    """Block the whole event loop (a coroutine making a blocking call: the classic asyncio
    bug, which freezes every agent of its process) the first time a key is seen."""
    if _first_time("block-once", key):
        time.sleep(3600)  # noqa: ASYNC251 - the point: it blocks the loop
    return f"unblocked {key}"
