from __future__ import annotations

from pathlib import Path

import pytest

from beamline import cli, config
from beamline.errors import ConfigError
from beamline.model_windows import known_window

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
providers:
  p: {kind: openai, base_url: "${TEST_BASE:-http://127.0.0.1:1}/v1", context_window: 8000}
agents:
  - {name: a, role: r, models: [{provider: p, model: m}]}
"""


def test_the_example_team_is_valid_and_its_tools_exist() -> None:
    deployment = config.load(ROOT / "infra/examples/research-team.yaml")
    deployment.check_tools()
    assert {a.role for a in deployment.agents} == {"research", "analysis", "writing"}


def test_environment_variables_expand_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.parse(GOOD).providers["p"].base_url == "http://127.0.0.1:1/v1"
    monkeypatch.setenv("TEST_BASE", "http://fakellm:8399")
    assert config.parse(GOOD).providers["p"].base_url == "http://fakellm:8399/v1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("agents: [", "not valid YAML"),
        ("- 1", "expected a mapping"),
        (
            GOOD.replace("provider: p", "provider: q"),
            "agents[0].models[0].provider: unknown provider 'q'",
        ),
        (
            GOOD + "  - {name: a, role: r, models: [{provider: p, model: m}]}\n",
            "duplicate agent name 'a'",
        ),
        (GOOD.replace("name: a", "name: 'a b'"), "agents[0]: name must be"),
        (GOOD.replace("kind: openai", "kind: bard"), "providers.p.kind"),
        (GOOD + "surprise: 1\n", "surprise"),
        (
            GOOD.replace("${TEST_BASE:-http://127.0.0.1:1}", "${NOT_SET_ANYWHERE_42}"),
            "NOT_SET_ANYWHERE_42 is not set",
        ),
    ],
)
def test_bad_deployments_are_rejected_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.parse(text)


def test_an_unknown_tool_is_named() -> None:
    deployment = config.parse(GOOD.replace("model: m}]", "model: m}], tools: [nope]"))
    with pytest.raises(ConfigError, match=r"agents\[0\].tools\[0\]: unknown tool 'nope'"):
        deployment.check_tools()


def test_the_readme_failover_snippet_declares_an_ordered_choice_list() -> None:
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("## Provider failover", 1)[1].split("```yaml\n", 1)[1]
    snippet = snippet.split("```", 1)[0]
    providers = (
        "providers:\n"
        "  openai: {kind: openai, base_url: 'http://127.0.0.1:1/v1'}\n"
        "  anthropic: {kind: anthropic, base_url: 'http://127.0.0.1:2'}\n"
    )
    (agent,) = config.parse(providers + snippet).agents
    assert [c.provider for c in agent.models] == ["openai", "anthropic"]


ISOLATED = """
providers:
  p: {kind: openai, base_url: "http://127.0.0.1:1/v1", context_window: 8000}
agents:
  - {name: a, role: r, models: [{provider: p, model: m}], isolation: process}
  - {name: b, role: r, models: [{provider: p, model: m}]}
  - {name: c, role: r, models: [{provider: p, model: m}]}
supervisors:
  - name: root
    strategy: one_for_one
    children: [{agent: a}, {agent: b}, {supervisor: pool}]
  - name: pool
    strategy: simple_one_for_one
    children: [{agent: c}]
"""


def test_a_process_isolated_agent_is_placed_like_a_pinned_agent() -> None:
    deployment = config.parse(ISOLATED)
    assert deployment.agent("a").isolation is config.Isolation.PROCESS  # type: ignore[union-attr]
    assert deployment.agent("b").isolation is config.Isolation.TASK  # type: ignore[union-attr]
    assert deployment.isolated_agents() == {"a"}
    assert deployment.pinned_agents() == {"a": {}}  # no labels needed: any live host


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            ISOLATED.replace("isolation: process}", "isolation: thread}"),
            "agents[0].isolation: Input should be 'task' or 'process'",
        ),
        (
            ISOLATED.replace("children: [{agent: a}, {agent: b},", "children: [{agent: b},"),
            "agents[0].isolation: process needs a supervisor to place and restart 'a'",
        ),
        (
            ISOLATED.replace("children: [{agent: c}]", "children: [{agent: a}]").replace(
                "[{agent: a}, {agent: b},", "[{agent: b},"
            ),
            "agents[0].isolation: 'a' is a simple_one_for_one pool's template",
        ),
    ],
)
def test_bad_isolation_is_rejected_naming_the_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.parse(text)


def test_the_readme_isolation_example_is_a_valid_deployment() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Isolation: a task of its host, or a process of its own", 1)[1]
    deployment = config.parse(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert deployment.isolated_agents() == {"scraper"}


def test_beamline_check_refuses_an_unsupervised_isolated_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(ISOLATED.replace("children: [{agent: a}, {agent: b},", "children: [{agent: b},"))
    with pytest.raises(SystemExit) as exited:
        cli.main(["check", str(bad)])
    assert exited.value.code == 2
    assert "agents[0].isolation: process needs a supervisor" in capsys.readouterr().err


WINDOWS = """
providers:
  p: {kind: openai, base_url: "http://127.0.0.1:1/v1"}
  local: {kind: openai, base_url: "http://127.0.0.1:2/v1", context_window: 32000}
agents:
  - name: a
    role: r
    models:
      - {provider: p, model: gpt-4o-mini}
      - {provider: p, model: claude-sonnet-4-5-20250929}
      - {provider: p, model: my-finetune, context_window: 16000}
      - {provider: local, model: llama-3-8b}
      - {provider: local, model: gpt-4o}
"""


def test_every_model_choice_gets_its_context_window_from_the_file_the_table_or_its_provider() -> (
    None
):
    (agent,) = config.parse(WINDOWS).agents
    assert [c.context_window for c in agent.models] == [128_000, 200_000, 16_000, 32_000, 128_000]
    assert agent.context == config.ContextPolicy(threshold=0.8, keep_turns=4)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "model: my-finetune, context_window: 16000}",
            "model: my-finetune}",
            "agents[0].models[2].context_window: no context window is known for model "
            "'my-finetune': give `context_window: <tokens>`",
        ),
        (
            "model: my-finetune, context_window: 16000}",
            "model: my-finetune, context_window: 0}",
            "agents[0].models[2].context_window: Input should be greater than 0",
        ),
        (
            "role: r\n",
            "role: r\n    max_tokens: 13000\n",
            "agents[0].models[2].context_window: 16000 tokens x threshold 0.8 leave no room "
            "for max_tokens 13000",
        ),
        (
            "role: r\n",
            "role: r\n    context: {threshold: 1}\n",
            "agents[0].context.threshold: Input should be less than 1",
        ),
        (
            "role: r\n",
            "role: r\n    context: {threshold: 0}\n",
            "agents[0].context.threshold: Input should be greater than 0",
        ),
        (
            "role: r\n",
            "role: r\n    context: {keep_turns: 0}\n",
            "agents[0].context.keep_turns: Input should be greater than or equal to 1",
        ),
        (
            "role: r\n",
            "role: r\n    context: {window: 5}\n",
            "agents[0].context.window: Extra inputs are not permitted",
        ),
    ],
)
def test_bad_context_settings_are_rejected_naming_the_field(
    old: str, new: str, message: str
) -> None:
    assert old in WINDOWS
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.parse(WINDOWS.replace(old, new, 1))


def test_beamline_check_names_the_model_whose_window_is_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(WINDOWS.replace("model: my-finetune, context_window: 16000}", "model: mine}"))
    with pytest.raises(SystemExit) as exit:
        cli.main(["check", str(bad)])
    assert exit.value.code != 0
    err = capsys.readouterr().err
    assert "agents[0].models[2].context_window: no context window is known for model 'mine'" in err


def test_known_windows_cover_dated_snapshots_and_aliases_but_not_unknown_names() -> None:
    assert known_window("gpt-4o-mini-2024-07-18") == 128_000
    assert known_window("claude-3-5-haiku-latest") == 200_000
    assert known_window("gpt-5-mini") == 400_000 and known_window("o1-mini") == 128_000
    assert known_window("fakellm") == 128_000
    assert known_window("m") is None and known_window("gpt-4omni") is None


def test_the_readme_context_pressure_example_is_a_valid_deployment() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Context pressure: long conversations fit", 1)[1]
    deployment = config.parse(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    (reader,) = deployment.agents
    assert [c.context_window for c in reader.models] == [32_000, 16_000]
    assert reader.context == config.ContextPolicy(threshold=0.8, keep_turns=4)
