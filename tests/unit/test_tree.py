"""The declared supervision tree: a bad tree is rejected naming the field, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from beamline import cli, config
from beamline.errors import ConfigError
from beamline.tree import INFINITY, ChildKind, Restart, Strategy

ROOT = Path(__file__).resolve().parents[2]

AGENTS = """
providers:
  p: {kind: openai, base_url: "http://127.0.0.1:1/v1", context_window: 8000}
agents:
  - {name: a, role: r, models: [{provider: p, model: m}]}
  - {name: b, role: r, models: [{provider: p, model: m}]}
  - {name: c, role: other, models: [{provider: p, model: m}]}
"""

NESTED = (
    AGENTS
    + """
hosts:
  - {name: h1, labels: {tier: hot}}
  - {name: h2, labels: {tier: cold, provider: p}}
supervisors:
  - name: root
    strategy: one_for_all
    intensity: 2
    period: 10
    children:
      - {supervisor: pool}
      - {agent: b, placement: {tier: hot}}
      - {agent: c, restart: transient, shutdown: brutal_kill, placement: {tier: cold}}
  - name: pool
    strategy: simple_one_for_one
    children:
      - {agent: a, restart: transient}
"""
)


def test_a_valid_nested_tree_is_accepted_with_otp_defaults() -> None:
    deployment = config.parse(NESTED)
    root, pool = deployment.supervisors
    assert (root.strategy, root.intensity, root.period) == (Strategy.ONE_FOR_ALL, 2, 10.0)
    assert (pool.intensity, pool.period) == (1, 5.0)
    sup_child, _, agent_child = root.children
    assert (sup_child.id, sup_child.kind, sup_child.restart) == (
        "pool",
        ChildKind.SUPERVISOR,
        Restart.PERMANENT,
    )
    assert sup_child.shutdown_or_default == INFINITY
    assert pool.children[0].shutdown_or_default == 5.0
    assert deployment.pools() == {"pool": "a"}
    assert deployment.member_spec("a-17") == deployment.agent("a")
    assert deployment.member_spec("b-17") is None
    assert agent_child.shutdown_or_default == "brutal_kill"


def test_the_supervised_example_is_valid() -> None:
    deployment = config.load(ROOT / "infra/examples/supervised-team.yaml")
    deployment.check_tools()
    assert [s.name for s in deployment.supervisors] == ["team", "analysis", "drafts"]


def test_beamline_check_names_the_offending_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(NESTED.replace("{agent: a, restart", "{agent: zed, restart"))
    with pytest.raises(SystemExit) as exited:
        cli.main(["check", str(bad)])
    assert exited.value.code == 2
    assert "supervisors[1].children[0].agent: unknown agent 'zed'" in capsys.readouterr().err


def _sup(name: str, children: str, extra: str = "") -> str:
    return f"  - {{name: {name}, strategy: one_for_one, children: [{children}]{extra}}}\n"


def _tree(*sups: str, hosts: str = "") -> str:
    return AGENTS + hosts + "supervisors:\n" + "".join(sups)


BAD = [
    (
        _tree("  - {name: s, strategy: one_for_some}\n"),
        "supervisors[0].strategy: Input should be 'one_for_one'",
    ),
    (
        _tree(_sup("s", "{agent: a, restart: sometimes}")),
        "supervisors[0].children[0].restart: Input should be 'permanent'",
    ),
    (
        _tree(_sup("s", "{agent: a, shutdown: soon}")),
        "supervisors[0].children[0].shutdown: must be seconds >= 0",
    ),
    (
        _tree(_sup("s", "{agent: a, shutdown: -1}")),
        "supervisors[0].children[0].shutdown: must be seconds >= 0",
    ),
    (
        _tree(_sup("s", "{agent: a}", ", intensity: -1")),
        "supervisors[0].intensity: Input should be greater than or equal to 0",
    ),
    (
        _tree(_sup("s", "{agent: a}", ", period: -5")),
        "supervisors[0].period: Input should be greater than 0",
    ),
    (_tree(_sup("s", "{agent: x}")), "supervisors[0].children[0].agent: unknown agent 'x'"),
    (
        _tree(_sup("s", "{supervisor: t}")),
        "supervisors[0].children[0].supervisor: unknown supervisor 't'",
    ),
    (
        _tree(_sup("s", "{agent: a, supervisor: s}")),
        "supervisors[0].children[0]: a child names exactly one of `agent` or `supervisor`",
    ),
    (_tree(_sup("s", "{}")), "supervisors[0].children[0]: a child names exactly one"),
    (
        _tree(_sup("s", "{agent: a}, {agent: b}, {agent: a}")),
        "supervisors[0].children[2]: duplicate child id 'a' in 's'",
    ),
    (
        _tree(_sup("root", "{supervisor: s}, {agent: a}"), _sup("s", "{agent: a}")),
        "supervisors[1].children[0].agent: agent 'a' is already supervised by 'root'",
    ),
    (
        _tree(_sup("s", "{agent: a}"), _sup("t", "{agent: b}")),
        "supervisors: more than one root (s, t)",
    ),
    (_tree(_sup("s", "{supervisor: s}")), "supervisors[0].children[0].supervisor: cycle s -> s"),
    (
        _tree(
            _sup("root", "{agent: a}"),
            _sup("s", "{supervisor: t}"),
            _sup("t", "{supervisor: u}"),
            _sup("u", "{supervisor: s}"),
        ),
        "supervisors[3].children[0].supervisor: cycle s -> t -> u -> s",
    ),
    (
        _tree(_sup("s", "{agent: a}"), _sup("s", "{agent: b}")),
        "supervisors[1].name: duplicate supervisor name 's'",
    ),
    (_tree(_sup("a", "{agent: b}")), "supervisors[0].name: 'a' is already an agent's name"),
    (
        _tree("  - {name: s, strategy: simple_one_for_one, children: [{agent: a}, {agent: c}]}\n"),
        "supervisors[0].children: a simple_one_for_one supervisor has exactly one child",
    ),
    (
        _tree("  - {name: s, strategy: simple_one_for_one, children: []}\n"),
        "supervisors[0].children: a simple_one_for_one supervisor has exactly one child",
    ),
    (
        _tree(
            "  - {name: s, strategy: simple_one_for_one, children: [{supervisor: t}]}\n",
            _sup("t", "{agent: c}"),
        ),
        "supervisors[0].children: a simple_one_for_one supervisor has exactly one child, an agent",
    ),
    (
        _tree(
            "  - {name: s, strategy: simple_one_for_one,"
            " children: [{agent: a, placement: {tier: hot}}]}\n",
            hosts="hosts: [{name: h1, labels: {tier: hot}}]\n",
        ),
        "supervisors[0].children[0].placement: pool members live in the hosts' mailbox shards",
    ),
    (
        AGENTS.replace("name: c,", "name: a-7,")
        + "supervisors:\n"
        + "  - {name: s, strategy: simple_one_for_one, children: [{agent: a}]}\n",
        "supervisors[0].children[0].agent: declared agents ['a-7'] are named like members",
    ),
    (
        _tree(
            _sup("s", "{agent: a, placement: {tier: hot, gpu: 'yes'}}"),
            hosts="hosts: [{name: h1, labels: {tier: hot}}, {name: h2, labels: {gpu: 'yes'}}]\n",
        ),
        "supervisors[0].children[0].placement: impossible placement",
    ),
    (
        _tree(_sup("s", "{agent: a}"), hosts="hosts: [{name: h}, {name: h}]\n"),
        "hosts[1].name: duplicate host name 'h'",
    ),
    (
        _tree(_sup("root", "{supervisor: s, placement: {tier: hot}}"), _sup("s", "{agent: a}")),
        "supervisors[0].children[0]: placement applies to agents",
    ),
    (_tree(_sup("s", "{agent: a, restrat: permanent}")), "supervisors[0].children[0].restrat"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_trees_are_rejected_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config.parse(text)
    assert message in str(raised.value)


def test_placement_is_only_checked_when_hosts_are_declared() -> None:
    config.parse(_tree(_sup("s", "{agent: a, placement: {tier: hot}}")))
    ok = "hosts: [{name: h1, labels: {tier: hot, gpu: 'yes'}}]\n"
    config.parse(_tree(_sup("s", "{agent: a, placement: {tier: hot, gpu: 'yes'}}"), hosts=ok))


def test_unsupervised_agents_and_an_empty_tree_are_fine() -> None:
    assert config.parse(AGENTS).supervisors == ()
    assert config.parse(_tree(_sup("s", "{agent: a}"))).supervisors[0].children[0].id == "a"
