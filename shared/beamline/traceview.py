"""A conversation or trace as a causal tree: who sent what to whom, LLM calls with tokens
and latency, tool calls with results (pure: rows in, text out)."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any


def summary(row: dict[str, Any]) -> str:
    try:
        p = json.loads(row.get("payload") or "{}")
    except json.JSONDecodeError:
        p = {"text": row.get("payload", "")}
    kind = row["kind"]
    if kind == "task":
        return f"task: {_short(p.get('prompt'))}"
    if kind == "llm_response":
        msg = p.get("message", {})
        calls = msg.get("tool_calls") or []
        what = ", ".join(f"{c['name']}({c.get('arguments', '')})" for c in calls) or _short(
            msg.get("content")
        )
        tokens = f"{row.get('input_tokens', 0)}+{row.get('output_tokens', 0)} tokens"
        return (
            f"llm {p.get('provider')}/{p.get('model')} {p.get('latency_ms', 0):.0f} ms, "
            f"{tokens}, attempts {p.get('attempts', 1)}: {what}"
        )
    if kind == "summary":
        tokens = f"{p.get('tokens_before')} -> {p.get('tokens_after')} of {p.get('window')} tokens"
        if p.get("fresh_window"):
            return f"fresh window ({tokens}): {_short(p.get('text'))}"
        return (
            f"summary by {p.get('provider')}/{p.get('model')} {p.get('latency_ms', 0):.0f} ms "
            f"({tokens}): {_short(p.get('text'))}"
        )
    if kind == "tool_result":
        err = f" [{p['error_reason']}]" if p.get("error_reason") else ""
        return f"tool {p.get('name')}{err} {p.get('duration_ms', 0):.1f} ms -> {_short(p.get('result'))}"
    if kind == "reply":
        return f"reply: {_short(p.get('text'))}"
    if kind == "error":
        return f"error [{p.get('reason')}]: {_short(p.get('message'))}"
    if kind == "dead_letter":
        return f"dead letter [{p.get('reason')}]: {_short(p.get('detail'))}"
    if kind == "event":
        return f"event {p.get('name')}: {_short(json.dumps(p.get('data', {})))}"
    return f"{kind}: {_short(row.get('payload'))}"


def render(rows: list[dict[str, Any]]) -> str:
    """Rows (ordered by time) as an indented tree following parent span ids."""
    if not rows:
        return "(no recorded messages)"
    spans = {r["span_id"] for r in rows}
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        parent = r.get("parent_span_id") or None
        children[parent if parent in spans else None].append(r)
    lines = [f"trace {rows[0]['trace_id']}  conversation {rows[0]['conversation_id']}"]

    def walk(parent: str | None, depth: int) -> None:
        for r in children.get(parent, []):
            lines.append(
                f"{'  ' * depth}- [{str(r['ts'])[11:23]}] {r['sender']} -> {r['recipient']}: "
                f"{summary(r)}"
            )
            if r["span_id"] != parent:
                walk(r["span_id"], depth + 1)

    walk(None, 1)
    return "\n".join(lines)


def _short(value: object, limit: int = 120) -> str:
    text = "" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
