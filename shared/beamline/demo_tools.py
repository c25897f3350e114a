"""Two real tools for the demo research team: exact arithmetic and a notes search."""

from __future__ import annotations

import ast
import operator
import re
from functools import lru_cache
from pathlib import Path

from beamline.tools import tool

_OPS: dict[type, object] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_MAX_EXPONENT = 1000  # 10**10**10 would hang the host: refuse it instead


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large")
        return _OPS[type(node.op)](left, right)  # type: ignore[operator,no-any-return]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))  # type: ignore[operator,no-any-return]
    raise ValueError(f"unsupported expression element: {ast.dump(node)[:60]}")


@tool
def calculator(expression: str) -> float:
    """Evaluate an arithmetic expression exactly, e.g. "(2.5 + 4) * 3 / 7". Supports
    + - * / // % ** and parentheses; no names or function calls."""
    if len(expression) > 500:
        raise ValueError("expression longer than 500 characters")
    return _eval(ast.parse(expression, mode="eval"))


@lru_cache(maxsize=1)
def _notes() -> list[tuple[str, str]]:
    """(title, body) of each `## ` section of the bundled notes."""
    text = (Path(__file__).parent / "data" / "notes.md").read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    return [(s.split("\n", 1)[0].strip(), s.split("\n", 1)[1].strip()) for s in sections]


@tool
def search_notes(query: str, limit: int = 3) -> list[dict[str, str]]:
    """Search the team's research notes; returns the best matching sections (title, text)."""
    words = {w for w in re.findall(r"[a-z0-9]+", query.lower()) if len(w) > 2}
    scored = []
    for title, body in _notes():
        haystack = f"{title} {body}".lower()
        score = sum(haystack.count(w) for w in words) + 3 * sum(w in title.lower() for w in words)
        if score:
            scored.append((score, title, body))
    scored.sort(key=lambda s: -s[0])
    return [{"title": t, "text": b} for _, t, b in scored[: max(1, min(limit, 10))]]


@tool
def read_log(day: int) -> str:
    """Read one day of the team's (long) incident log."""
    entry = (
        f"day {day}: the {['hot', 'cold'][day % 2]} host restarted {day} agents from their "
        f"journals in {day * 3} ms; no message was lost. "
    )
    return (f"incident log, day {day}. " + entry * 12)[:1200]
