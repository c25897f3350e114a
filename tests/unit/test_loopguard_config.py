"""`loop_guard:` in the deployment file: on by default, `off` disables it, a pool member gets
its template's; a bad value is rejected naming the field, at `beamline check` too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from beamline import config
from beamline.errors import ConfigError
from beamline.guard import (
    Addendum,
    Loop,
    LoopGuard,
    LoopKind,
    OnTimeout,
    Rung,
    addendum_text,
    with_addendum,
)

FILE = """
providers:
  p: {kind: openai, base_url: "http://127.0.0.1:1/v1", context_window: 128000}
agents:
  - {name: a, role: r, models: [{provider: p, model: m}]}
  - name: b
    role: r
    models: [{provider: p, model: m}]
    loop_guard: {same_tool_calls: 4, ladder: [escalate], on_timeout: stop}
  - {name: quiet, role: r, models: [{provider: p, model: m}], loop_guard: off}
  - {name: w, role: w, models: [{provider: p, model: m}], loop_guard: {ladder: []}}
supervisors:
  - name: team
    strategy: one_for_one
    children: [{agent: b}, {supervisor: pool}]
  - name: pool
    strategy: simple_one_for_one
    children: [{agent: w}]
"""


def test_the_guard_is_on_by_default_off_on_request_and_a_pool_member_gets_its_templates() -> None:
    deployment = config.parse(FILE)
    default = deployment.loop_guard("a")
    assert default == LoopGuard()
    assert default.ladder == (Rung.RESTART, Rung.ESCALATE) and default.same_tool_calls == 3
    assert default.on_timeout is OnTimeout.RESUME and default.similarity == 0.9
    tuned = deployment.loop_guard("b")
    assert tuned is not None and tuned.same_tool_calls == 4 and tuned.ladder == (Rung.ESCALATE,)
    assert tuned.on_timeout is OnTimeout.STOP
    assert deployment.loop_guard("quiet") is None  # YAML's `off` reads as false
    member = deployment.loop_guard("w-7")
    assert member is not None and member.ladder == ()  # detect and record only
    assert deployment.loop_guard("nobody") is None
    assert deployment.is_supervised("b") and deployment.is_supervised("w-7")
    assert not deployment.is_supervised("a") and not deployment.is_supervised("nobody")


def test_the_ladder_climbs_and_its_last_rung_repeats() -> None:
    guard = LoopGuard()
    assert [guard.rung(n) for n in range(4)] == [
        Rung.RESTART,
        Rung.ESCALATE,
        Rung.ESCALATE,
        Rung.ESCALATE,
    ]
    assert LoopGuard(ladder=()).rung(0) is None


@pytest.mark.parametrize(
    ("new", "message"),
    [
        (
            "loop_guard: {ladder: [restart, pray]}",
            "agents[0].loop_guard.ladder[1]: Input should be 'restart', 'escalate' or 'stop'",
        ),
        (
            "loop_guard: {same_tool_calls: 1}",
            "agents[0].loop_guard.same_tool_calls: must be 0 (not watched) or at least 2",
        ),
        (
            "loop_guard: {similarity: 1.5}",
            "agents[0].loop_guard.similarity: Input should be less than or equal to 1",
        ),
        (
            "loop_guard: {escalation_timeout_s: 0}",
            "agents[0].loop_guard.escalation_timeout_s: Input should be greater than 0",
        ),
        (
            "loop_guard: {on_timeout: wait}",
            "agents[0].loop_guard.on_timeout: Input should be 'resume' or 'stop'",
        ),
        ("loop_guard: {retries: 3}", "agents[0].loop_guard.retries: Extra inputs"),
        ("loop_guard: sometimes", "agents[0].loop_guard: Input should be a valid dictionary"),
    ],
)
def test_a_bad_loop_guard_is_rejected_naming_the_field(new: str, message: str) -> None:
    old = "models: [{provider: p, model: m}]}"
    text = FILE.replace(old, f"models: [{{provider: p, model: m}}], {new}}}", 1)
    with pytest.raises(ConfigError) as caught:
        config.parse(text)
    assert message in str(caught.value)


def test_the_cli_check_rejects_an_unknown_rung_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(FILE.replace("ladder: [escalate]", "ladder: [escalate, shrug]"))
    run = subprocess.run(
        [str(Path(sys.executable).parent / "beamline"), "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert "agents[1].loop_guard.ladder[1]: Input should be" in run.stderr


def test_the_addendum_says_what_repeated_and_joins_only_its_conversations_system_prompt() -> None:
    loop = Loop(kind=LoopKind.SAME_TOOL_CALL, count=3, tool="search", arguments='{"q":"x"}')
    text = addendum_text(loop, say="use the cache")
    assert 'called the tool `search` 3 times with the same arguments {"q":"x"}' in text
    assert text.startswith("Loop guard:") and text.endswith("says: use the cache")
    prompt = "You are a researcher."
    addendum = Addendum(conversation_id="c1", text=text)
    guarded = with_addendum(prompt, addendum, "c1")
    assert guarded == f"You are a researcher.\n\n{text}"
    assert guarded.startswith(prompt)  # the agent's own prompt first, unchanged
    assert with_addendum(prompt, addendum, "c2") == prompt  # another conversation
    assert with_addendum(prompt, None, "c1") == prompt
    assert with_addendum("", addendum, "c1") == text
    similar = Loop(kind=LoopKind.SIMILAR_OUTPUT, count=3, text="I will check again. " * 30)
    assert "3 nearly identical answers in a row" in addendum_text(similar)
    assert len(similar.describe()) < 400  # the repeated text is quoted, shortened
