"""Budgets and the price table in the deployment file: checked on arrival, naming the field,
and nothing half-applied (a rejected file yields no deployment at all)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from beamline import config
from beamline.budget import AccountKind, Budget
from beamline.errors import ConfigError

FILE = """
providers:
  p: {kind: openai, base_url: "http://127.0.0.1:1/v1", context_window: 8000}
agents:
  - {name: a, role: r, models: [{provider: p, model: m}], budget: {tokens: 1000}}
  - {name: b, role: r, models: [{provider: p, model: m2}]}
  - {name: w, role: w, models: [{provider: p, model: m}]}
supervisors:
  - name: team
    strategy: one_for_one
    budget: {usd: 2.5, tokens: 5000}
    children: [{agent: a}, {supervisor: pool}]
  - name: pool
    strategy: simple_one_for_one
    children: [{agent: w}]
prices:
  p:
    m: {input: 0.15, output: 0.6}
"""


def test_budgets_and_prices_load_and_chain_up_the_tree() -> None:
    deployment = config.parse(FILE)
    assert deployment.agent("a").budget == Budget(tokens=1000)  # type: ignore[union-attr]
    assert deployment.price("p", "m").cost(1_000_000, 1_000_000) == pytest.approx(0.75)  # type: ignore[union-attr]
    chain = deployment.budget_chain("a")
    assert [(c.kind, c.name) for c in chain] == [
        (AccountKind.AGENT, "a"),
        (AccountKind.SUPERVISOR, "team"),
    ]
    # a pool member is charged to itself (its template's budget), its pool and up
    assert [c.key for c in deployment.budget_chain("w-7")] == [
        "agent:w-7",
        "supervisor:pool",
        "supervisor:team",
    ]
    assert deployment.budgeted("w-7") and not deployment.budgeted("b")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "budget: {tokens: 1000}",
            "budget: {tokens: lots}",
            "agents[0].budget.tokens: Input should be a valid integer",
        ),
        (
            "budget: {tokens: 1000}",
            "budget: 1000",
            "agents[0].budget: Input should be a valid dictionary",
        ),
        (
            "budget: {tokens: 1000}",
            "budget: {tokens: -1}",
            "agents[0].budget.tokens: Input should be greater than or equal to 0",
        ),
        (
            "budget: {tokens: 1000}",
            "budget: {}",
            "agents[0].budget: a budget sets `tokens`, `usd` or both",
        ),
        (
            "budget: {tokens: 1000}",
            "budget: {dollars: 3}",
            "agents[0].budget.dollars: Extra inputs",
        ),
        (
            "budget: {usd: 2.5, tokens: 5000}",
            "budget: {usd: -2.5}",
            "supervisors[0].budget.usd: Input should be greater than or equal to 0",
        ),
        (
            "m: {input: 0.15, output: 0.6}",
            "m: {input: 0.15, output: cheap}",
            "prices.p.m.output: Input should be a valid number",
        ),
        (
            "m: {input: 0.15, output: 0.6}",
            "m: {input: -1, output: 0.6}",
            "prices.p.m.input: Input should be greater than or equal to 0",
        ),
        ("m: {input: 0.15, output: 0.6}", "m: {input: 0.15}", "prices.p.m.output: Field required"),
        (
            "    m: {input",
            "    gpt-9: {input: 1, output: 1}\n    m: {input",
            "prices.p.gpt-9: unknown model: no agent uses p/gpt-9",
        ),
        ("prices:\n  p:", "prices:\n  q: {}\n  p:", "prices.q: unknown provider"),
        # a cost budget on the team needs every model its agents may call priced
        (
            "m: {input: 0.15, output: 0.6}",
            "m2: {input: 0.15, output: 0.6}",
            "agents[0].models[0]: p/m has no price, but supervisor:team has a cost budget",
        ),
    ],
)
def test_a_bad_budget_or_price_table_is_rejected_naming_the_field(
    old: str, new: str, message: str
) -> None:
    assert old in FILE
    with pytest.raises(ConfigError) as caught:
        config.parse(FILE.replace(old, new, 1))
    assert message in str(caught.value)


def test_the_cli_check_rejects_a_bad_budget_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(FILE.replace("budget: {tokens: 1000}", "budget: {tokens: -5}"))
    run = subprocess.run(
        [str(Path(sys.executable).parent / "beamline"), "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert "agents[0].budget.tokens" in run.stderr
