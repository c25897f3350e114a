"""guard_overhead_pct: mesh throughput with every guard running vs with none, same run.

The same 200 supervised agents take the same tasks twice, each time on a fresh mesh:
- none: no budgets, no loop guard, and the guard services not started;
- guards: a token budget on every agent and on their supervisor (so every LLM call takes a
  reservation checked against the agent and its subtree, settled from the gateway's usage
  event), and the loop guard watching every journaled step.
Both have what every agent and gateway always does: the context-pressure estimate before
each call, and the gateway's breakers.
The overhead is 1 - guards/none, in percent; target <= 15 %. The two alternate, ROUNDS
times each, and each keeps its best round: other work on the machine slows one round, not
the configuration. On this 2-core VM the same mesh's rounds spread by up to 25 % from one
minute to the next (nats-server's CPU per task alone varies 2x), so a best of 2 moved the
ratio by +-20 points; 4 rounds each narrow that. The ratio of the medians is printed too.
"""

from __future__ import annotations

from pathlib import Path
from statistics import median
from typing import Any

from bench import e2e, local_nats
from bench.local_nats import local_mesh

AGENTS = 200
ROUNDS = 4
TARGET_PCT = 15.0
BUDGET = "budget: {tokens: 1000000000000}"


def config(guards: bool) -> str:
    agent_budget = f", {BUDGET}" if guards else ""
    return (
        """
version: 1
providers:
  fakellm: {kind: openai, base_url: "${BEAMLINE_FAKELLM_URL}/v1", timeout_s: 30,
            context_window: 128000}
agents:
"""
        + "".join(
            f"  - {{name: a{i}, role: bench, models: [{{provider: fakellm, model: m}}]"
            f"{agent_budget}}}\n"
            for i in range(AGENTS)
        )
        + f"""
supervisors:
  - name: root
    strategy: one_for_one
    intensity: 1000
    period: 5
    {BUDGET if guards else ""}
    children:
"""
        + "".join(f"      - {{agent: a{i}}}\n" for i in range(AGENTS))
    )


async def throughput(work: Path, guards: bool, tasks: int, round_no: int) -> float:
    name = f"{'guards' if guards else 'none'}-{round_no}"
    cfg, script = local_nats.write_inputs(work / name, "bench", config(guards), e2e.SCRIPT)
    async with local_mesh(work / name, cfg, script, guards=guards) as (_, nc):
        await e2e.e2e_tasks_per_s(nc, 200, prefix=name + "-warm")  # imports, connections
        result = await e2e.e2e_tasks_per_s(nc, tasks, prefix=name)
    return float(result["e2e_tasks_per_s"])


async def guard_overhead(work: Path, tasks: int) -> dict[str, Any]:
    nones: list[float] = []
    guardeds: list[float] = []
    for round_no in range(ROUNDS):
        nones.append(await throughput(work, False, tasks, round_no))
        guardeds.append(await throughput(work, True, tasks, round_no))
    none, guarded = max(nones), max(guardeds)
    return {
        "guard_none_tasks_per_s": none,
        "guard_all_tasks_per_s": guarded,
        "guard_overhead_pct": round((1 - guarded / none) * 100, 1),
        "guard_overhead_target": f"<= {TARGET_PCT:.0f} %",
        "guard_overhead_median_pct": round((1 - median(guardeds) / median(nones)) * 100, 1),
        # every round, so a reader sees how far the machine's own noise moves the ratio
        "guard_none_rounds": [round(r, 1) for r in nones],
        "guard_all_rounds": [round(r, 1) for r in guardeds],
    }
