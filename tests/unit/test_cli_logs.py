"""`beamline logs`: the --since parser, the flag checks and the one-line rendering (no mesh)."""

from __future__ import annotations

import json

import pytest

from beamline import cli, logview, reads
from beamline.readonly import check_readonly_sql


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("10m", 600),
        ("2h", 7200),
        ("1d", 86_400),
        (" 45m ", 2700),
        ("3650d", 315_360_000),
    ],
)
def test_since_accepts_a_number_and_a_unit(text: str, seconds: int) -> None:
    assert logview.parse_since(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "10", "m", "10x", "1.5h", "-5m", "10 min", "0s", "3651d", "1e3s"]
)
def test_since_rejects_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        logview.parse_since(text)


@pytest.mark.parametrize(
    ("argv", "flag", "detail"),
    [
        (["--since", "10x"], "--since", "is not a duration"),
        (["--since", "0m"], "--since", "more than zero"),
        (["--kind", "gossip"], "--kind", "unknown kind 'gossip'"),
        (["--limit", "0"], "--limit", "out of range 1..10000"),
        (["--limit", "10001"], "--limit", "out of range 1..10000"),
        (["--limit", "many"], "--limit", "not a whole number"),
        (["--agent", ""], "--agent", "must not be empty"),
        (["--conversation", " "], "--conversation", "must not be empty"),
    ],
)
def test_bad_flags_exit_2_with_an_error_naming_the_flag(
    argv: list[str], flag: str, detail: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["logs", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and detail in err, err


def test_every_kind_and_raw_are_accepted() -> None:
    for kind in ("task", "reply", "error", "llm_response", "tool_result", "event", "raw"):
        assert cli._parser().parse_args(["logs", "--kind", kind]).kind == kind


def test_flags_become_parameters_and_the_statement_never_changes() -> None:
    args = cli._parser().parse_args(
        ["logs", "--agent", "analyst", "--since", "10m", "--kind", "reply", "--limit", "5"]
    )
    params = logview.parameters(args.agent, args.since, args.kind, args.conversation, args.limit)
    assert params == {
        "agent": "analyst",
        "since_s": 600,
        "kind": "reply",
        "conversation": "",
        "limit": 5,
    }
    assert logview.parameters() == {
        "agent": "",
        "since_s": 0,
        "kind": "",
        "conversation": "",
        "limit": 100,
    }
    # the read-only guard accepts it: one SELECT, every value a server-side parameter
    hostile = logview.parameters(agent="' OR 1=1 --", conversation="'); DROP TABLE x; --")
    statement, bound = check_readonly_sql(reads.LOGS_SQL, hostile)
    assert bound == hostile and "OR 1=1" not in statement and "DROP" not in statement


def test_a_row_renders_as_one_line_with_time_kind_route_and_summary() -> None:
    row = {
        "ts": "2026-11-23T10:00:01.234567Z",
        "kind": "reply",
        "sender": "analyst",
        "recipient": "cli",
        "payload": json.dumps({"text": "That call\ncosts 0.00045 dollars."}),
    }
    assert logview.line(row) == (
        "2026-11-23 10:00:01.234  reply        analyst -> cli: "
        "reply: That call costs 0.00045 dollars."
    )
    raw = {**row, "kind": "raw", "payload": "not json at all"}
    assert logview.line(raw).endswith("raw: not json at all")
    assert logview.render([row, raw]).count("\n") == 1
