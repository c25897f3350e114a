"""`beamline logs`: its flags checked, the parameters of `reads.LOGS_SQL`, and one line per
recorded message (pure: text in, values or text out)."""

from __future__ import annotations

import re
from typing import Any, Final

from beamline.envelope import Kind
from beamline.rows import KIND_RAW
from beamline.traceview import summary

KINDS: Final = (*(k.value for k in Kind), KIND_RAW)
MAX_LIMIT: Final = 10_000
MAX_SINCE_S: Final = 3650 * 86_400  # ten years; fits the UInt32 parameter
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_SINCE = re.compile(r"^\s*(\d{1,9})\s*([smhd])\s*$")


def parse_since(text: str) -> int:
    """`30s`, `10m`, `2h`, `1d` as seconds (> 0); ValueError saying what is accepted."""
    match = _SINCE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration: use a number and s, m, h or d (e.g. 10m)")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r} must be more than zero")
    if seconds > MAX_SINCE_S:
        raise ValueError(f"{text!r} is more than {MAX_SINCE_S // 86_400}d")
    return seconds


def parse_kind(text: str) -> str:
    if text not in KINDS:
        raise ValueError(f"unknown kind {text!r}: one of {', '.join(KINDS)}")
    return text


def parse_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"{value} is out of range 1..{MAX_LIMIT}")
    return value


def parse_name(text: str) -> str:
    """An agent or conversation id: any text (bound as a parameter), but not empty."""
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def parameters(
    agent: str | None = None,
    since_s: int | None = None,
    kind: str | None = None,
    conversation: str | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    """The values for `reads.LOGS_SQL`; '' or 0 means "no filter"."""
    return {
        "agent": agent or "",
        "since_s": since_s or 0,
        "kind": kind or "",
        "conversation": conversation or "",
        "limit": limit,
    }


def _time(ts: object) -> str:
    text = str(ts)  # ISO 8601 from the query endpoint: 2026-11-23T10:00:00.123456Z
    return f"{text[:10]} {text[11:23]}" if len(text) >= 19 else text


def line(row: dict[str, Any]) -> str:
    return (
        f"{_time(row.get('ts'))}  {row['kind']:<12} "
        f"{row.get('sender', '')} -> {row.get('recipient', '')}: {summary(row)}"
    )


def render(rows: list[dict[str, Any]]) -> str:
    return "\n".join(line(r) for r in rows)
