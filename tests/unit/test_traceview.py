from __future__ import annotations

import json
from pathlib import Path

import pytest

from beamline import cli, traceview

ROOT = Path(__file__).resolve().parents[2]


def row(
    kind: str, span: str, parent: str, payload: dict[str, object], **kw: object
) -> dict[str, object]:
    base: dict[str, object] = {
        "id": span,
        "kind": kind,
        "sender": "s",
        "recipient": "r",
        "conversation_id": "c",
        "trace_id": "t" * 32,
        "span_id": span,
        "parent_span_id": parent,
        "ts": "2026-11-23 10:00:00.000000",
        "input_tokens": 0,
        "output_tokens": 0,
        "payload": json.dumps(payload),
    }
    base.update(kw)
    return base


def test_a_trace_renders_as_a_causal_tree_with_tokens_and_tool_results() -> None:
    rows = [
        row("task", "a", "", {"prompt": "what is 2+2"}),
        row(
            "llm_response",
            "b",
            "a",
            {
                "provider": "p",
                "model": "m",
                "latency_ms": 12,
                "message": {"tool_calls": [{"name": "calculator", "arguments": "{}"}]},
            },
            input_tokens=30,
            output_tokens=5,
        ),
        row("tool_result", "c", "b", {"name": "calculator", "result": "4", "duration_ms": 0.5}),
        row("reply", "d", "a", {"text": "4"}),
    ]
    lines = traceview.render(rows).splitlines()
    assert lines[1].startswith("  - ") and "task: what is 2+2" in lines[1]
    assert lines[2].startswith("    - ") and "30+5 tokens" in lines[2] and "calculator(" in lines[2]
    assert lines[3].startswith("      - ") and "-> 4" in lines[3]
    assert lines[4].startswith("    - ") and "reply: 4" in lines[4]


def test_summaries_and_fresh_windows_show_what_they_shortened() -> None:
    shortened = {"text": "read 3 pages", "tokens_before": 1300, "tokens_after": 640}
    summary = row(
        "summary",
        "b",
        "a",
        {**shortened, "window": 1500, "provider": "p", "model": "m", "latency_ms": 9},
    )
    fresh = row("summary", "c", "a", {**shortened, "window": 1500, "fresh_window": True})
    assert (
        traceview.summary(summary)
        == "summary by p/m 9 ms (1300 -> 640 of 1500 tokens): read 3 pages"
    )
    assert traceview.summary(fresh) == "fresh window (1300 -> 640 of 1500 tokens): read 3 pages"


def test_an_empty_trace_says_so() -> None:
    assert traceview.render([]) == "(no recorded messages)"


def test_check_accepts_the_example_and_names_the_field_of_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as ok:
        cli.main(["check", str(ROOT / "infra/examples/research-team.yaml")])
    assert ok.value.code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("agents: [{name: a, role: r, models: []}]\n")
    with pytest.raises(SystemExit) as failed:
        cli.main(["check", str(bad)])
    assert failed.value.code == 2
    assert "agents[0].models" in capsys.readouterr().err
