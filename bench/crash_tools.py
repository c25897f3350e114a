"""The restart bench's tool: crashes its agent the first time it sees a key (per host
process), so each task costs exactly one crash and one restart."""

from __future__ import annotations

from beamline.tools import Crash, tool

_seen: set[str] = set()


@tool
def crash_once(key: str) -> str:
    """Crash the agent the first time a key is seen; succeed after."""
    if key not in _seen:
        _seen.add(key)
        raise Crash(f"crash_once({key!r})")
    return f"survived {key}"
