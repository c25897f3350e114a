"""The deployment file: providers, agents, hosts and supervisors, validated on arrival.

Errors name the offending field, e.g. `agents[1].models[0].provider: unknown provider 'x'`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from beamline.budget import Account, AccountKind, Budget, Price
from beamline.errors import ConfigError
from beamline.guard import LoopGuard
from beamline.ids import is_token
from beamline.model_windows import known_window
from beamline.tools import import_tool_modules, registered
from beamline.tree import Host, Strategy, SupervisorSpec, check_tree, pool_template


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Provider(Strict):
    kind: Literal["openai", "anthropic"]
    base_url: str
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the key; keys never go in files."
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Read timeout per attempt.")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=4, ge=1, le=10)
    breaker_fail_max: int = Field(default=5, ge=1)
    breaker_reset_s: float = Field(default=30.0, gt=0)
    context_window: int | None = Field(
        default=None,
        gt=0,
        description="Tokens (input + output) of any of its models not in the built-in table "
        "(beamline.model_windows): for a self-hosted server's models, say.",
    )


class ModelChoice(Strict):
    provider: str
    model: str
    context_window: int | None = Field(
        default=None,
        gt=0,
        description="Tokens (input + output) the model takes. Default: the built-in table, "
        "then the provider's context_window; a deployment fills it in when it loads.",
    )


class ContextPolicy(Strict):
    """When an agent's conversation is shortened for its model's context window: a request
    estimated above `threshold` x the window has its older turns summarised, keeping the
    latest `keep_turns` turns (and the current task's prompt) as they are."""

    threshold: float = Field(default=0.8, gt=0, lt=1)
    keep_turns: int = Field(default=4, ge=1)


class Isolation(StrEnum):
    """Where an agent's code runs. `task`: an asyncio task of its host, next to thousands of
    others (density). `process`: an OS process of its own, started and watched by its host,
    so a segfault, `os._exit`, a memory blow-up or a blocking tool ends only that agent."""

    TASK = "task"
    PROCESS = "process"


class AgentSpec(Strict):
    name: str
    role: str
    system_prompt: str = "You are a helpful assistant."
    models: tuple[ModelChoice, ...] = Field(min_length=1)
    tools: tuple[str, ...] = ()
    max_steps: int = Field(default=8, ge=1, le=100)
    max_tokens: int = Field(default=1024, gt=0)
    output: Literal["text", "json"] = "text"
    budget: Budget | None = Field(
        default=None, description="What this agent may spend (beamline.budget)."
    )
    isolation: Isolation = Field(
        default=Isolation.TASK, description="task (share the host process) or process."
    )
    context: ContextPolicy = Field(
        default_factory=ContextPolicy, description="Context pressure: when to summarise."
    )
    loop_guard: LoopGuard = Field(
        default_factory=LoopGuard,
        description="Loop detection and its ladder (beamline.guard); `off` disables it.",
    )

    @model_validator(mode="after")
    def _names_are_tokens(self) -> AgentSpec:
        for field in ("name", "role"):
            if not is_token(getattr(self, field)):
                raise ValueError(f"{field} must be 1-128 of A-Z a-z 0-9 _ -")
        return self


class Deployment(Strict):
    version: Literal[1] = 1
    tools_modules: tuple[str, ...] = ()
    providers: dict[str, Provider] = Field(default_factory=dict)
    agents: tuple[AgentSpec, ...] = ()
    hosts: tuple[Host, ...] | None = Field(
        default=None, description="Declared hosts; when present, placements are checked."
    )
    supervisors: tuple[SupervisorSpec, ...] = Field(
        default=(), description="The supervision tree (see beamline.tree)."
    )
    prices: dict[str, dict[str, Price]] = Field(
        default_factory=dict,
        description="provider -> model -> USD per million input/output tokens (cost budgets).",
    )

    @model_validator(mode="after")
    def _references_resolve(self) -> Deployment:
        seen: set[str] = set()
        for i, agent in enumerate(self.agents):
            if agent.name in seen:
                raise ValueError(f"agents[{i}].name: duplicate agent name {agent.name!r}")
            seen.add(agent.name)
            for j, choice in enumerate(agent.models):
                if choice.provider not in self.providers:
                    raise ValueError(
                        f"agents[{i}].models[{j}].provider: unknown provider {choice.provider!r}"
                        f" (declared: {sorted(self.providers)})"
                    )
        check_tree(self.supervisors, {a.name: a.role for a in self.agents}, self.hosts)
        self._check_prices()
        self._check_isolation()
        # frozen models: the resolved windows are set once, here, while validating
        object.__setattr__(
            self, "agents", tuple(self._with_windows(i, a) for i, a in enumerate(self.agents))
        )
        self.__dict__.pop("_agents_by_name", None)  # built by the checks, from the old tuple
        return self

    def _with_windows(self, i: int, agent: AgentSpec) -> AgentSpec:
        """The agent with every model choice's context window filled in: its own, else the
        built-in table's, else its provider's. An agent must know each of its windows (a
        call may fail over to any of them), and each must leave its answer room under the
        threshold."""
        choices = []
        for j, choice in enumerate(agent.models):
            window = (
                choice.context_window
                or known_window(choice.model)
                or self.providers[choice.provider].context_window
            )
            if window is None:
                raise ValueError(
                    f"agents[{i}].models[{j}].context_window: no context window is known for "
                    f"model {choice.model!r}: give `context_window: <tokens>` on this model "
                    f"choice, or on provider {choice.provider!r} for all its models"
                )
            if window * agent.context.threshold <= agent.max_tokens:
                raise ValueError(
                    f"agents[{i}].models[{j}].context_window: {window} tokens x threshold "
                    f"{agent.context.threshold} leave no room for max_tokens {agent.max_tokens}: "
                    "raise the window or the threshold, or lower max_tokens"
                )
            choices.append(choice.model_copy(update={"context_window": window}))
        return agent.model_copy(update={"models": tuple(choices)})

    def _check_prices(self) -> None:
        """Every model in the price table is one some agent uses (a typo would otherwise
        leave the real model unpriced), and every model an agent may call is priced when a
        cost budget anywhere on its chain needs it."""
        used = {(c.provider, c.model) for a in self.agents for c in a.models}
        for provider, models in self.prices.items():
            if provider not in self.providers:
                raise ValueError(
                    f"prices.{provider}: unknown provider (declared: {sorted(self.providers)})"
                )
            for model in models:
                if (provider, model) not in used:
                    raise ValueError(
                        f"prices.{provider}.{model}: unknown model: no agent uses "
                        f"{provider}/{model} (used: {sorted(f'{p}/{m}' for p, m in used)})"
                    )
        for i, agent in enumerate(self.agents):
            costed = [
                a for a in self.budget_chain(agent.name) if a.budget and a.budget.usd is not None
            ]
            if not costed:
                continue
            for j, choice in enumerate(agent.models):
                if choice.model not in self.prices.get(choice.provider, {}):
                    raise ValueError(
                        f"agents[{i}].models[{j}]: {choice.provider}/{choice.model} has no "
                        f"price, but {costed[0].key} has a cost budget: add "
                        f"prices.{choice.provider}.{choice.model}: {{input: ..., output: ...}}"
                    )

    def price(self, provider: str, model: str) -> Price | None:
        return self.prices.get(provider, {}).get(model)

    def budget_chain(self, agent: str) -> tuple[Account, ...]:
        """The accounts a call by `agent` is charged to: the agent's own (a pool member's is
        its template's budget), then each ancestor supervisor's up to the root."""
        spec = self.member_spec(agent)
        own = Account(kind=AccountKind.AGENT, name=agent, budget=spec.budget if spec else None)
        template = None if self.agent(agent) else pool_template(agent, self._pool_templates)
        return (own, *self._supervisor_chains.get(template or agent, ()))

    @cached_property
    def _supervisor_chains(self) -> dict[str, tuple[Account, ...]]:
        """Each declared child's ancestor supervisors' accounts, nearest first: computed once
        (the gateway and the budget service ask per call), one entry per declared name."""
        parents = {c.id: s.name for s in self.supervisors for c in s.children}
        by_name = {s.name: s for s in self.supervisors}
        chains: dict[str, tuple[Account, ...]] = {}
        for child in parents:
            chain: list[Account] = []
            parent: str | None = parents[child]
            while parent is not None and all(a.name != parent for a in chain):
                budget = by_name[parent].budget
                chain.append(Account(kind=AccountKind.SUPERVISOR, name=parent, budget=budget))
                parent = parents.get(parent)
            chains[child] = tuple(chain)
        return chains

    @cached_property
    def _pool_templates(self) -> frozenset[str]:
        return frozenset(self.pools().values())

    @cached_property
    def _agents_by_name(self) -> dict[str, AgentSpec]:
        return {a.name: a for a in self.agents}

    def budgeted(self, agent: str) -> bool:
        """Whether a call by `agent` must be reserved: some account on its chain has a budget."""
        return any(a.budget is not None for a in self.budget_chain(agent))

    def _check_isolation(self) -> None:
        """A process-isolated agent is placed like a pinned agent (its own mailbox consumer,
        opened by its own process on the host the supervisor picks), so it needs a supervisor
        to place, start and restart it; and it cannot be a pool template: pool members live
        in the hosts' hash shards, and a process per member would defeat a pool's density."""
        supervised = self.supervised_agents()
        templates = set(self.pools().values())
        for i, agent in enumerate(self.agents):
            if agent.isolation is not Isolation.PROCESS:
                continue
            if agent.name in templates:
                raise ValueError(
                    f"agents[{i}].isolation: {agent.name!r} is a simple_one_for_one pool's "
                    "template; pool members share their hosts' processes (isolation: task)"
                )
            if agent.name not in supervised:
                raise ValueError(
                    f"agents[{i}].isolation: process needs a supervisor to place and restart "
                    f"{agent.name!r}; name it as a child of one, or use isolation: task"
                )

    def agent(self, name: str) -> AgentSpec | None:
        return self._agents_by_name.get(name)

    def supervised_agents(self) -> frozenset[str]:
        """Agents some supervisor names: they run only when it starts them."""
        return frozenset(c.agent for s in self.supervisors for c in s.children if c.agent)

    def pinned_agents(self) -> dict[str, dict[str, str]]:
        """Agents with placement labels, and process-isolated agents -> the labels they need
        (none: any host): each gets its own mailbox consumer, on a host the supervisor
        picks, instead of living in a hash shard."""
        isolated = self.isolated_agents()
        return {
            c.agent: c.placement
            for s in self.supervisors
            for c in s.children
            if c.agent and (c.placement or c.agent in isolated)
        }

    def isolated_agents(self) -> frozenset[str]:
        """Agents that run as an OS process of their own (`isolation: process`)."""
        return frozenset(a.name for a in self.agents if a.isolation is Isolation.PROCESS)

    def pools(self) -> dict[str, str]:
        """simple_one_for_one supervisors -> the agent their members instantiate."""
        return {
            s.name: s.children[0].id
            for s in self.supervisors
            if s.strategy is Strategy.SIMPLE_ONE_FOR_ONE and s.children
        }

    def member_spec(self, name: str) -> AgentSpec | None:
        """The spec an agent runs: its own, or its pool template's for a pool member."""
        spec = self.agent(name)
        if spec is not None:
            return spec
        template = pool_template(name, self._pool_templates)
        return None if template is None else self.agent(template)

    def loop_guard(self, agent: str) -> LoopGuard | None:
        """What watches `agent` for loops (a pool member: its template's), or None: an
        unknown agent, or `loop_guard: off`."""
        spec = self.member_spec(agent)
        return spec.loop_guard if spec is not None and spec.loop_guard.enabled else None

    def is_supervised(self, agent: str) -> bool:
        """Whether a supervisor starts and restarts `agent` (a named child or a pool member)."""
        if agent in self.supervised_agents():
            return True
        return self.agent(agent) is None and pool_template(agent, self.pools().values()) is not None

    def check_tools(self) -> None:
        """Import tool modules and check every agent's tools exist. Call where tools run."""
        import_tool_modules(list(self.tools_modules))
        known = registered()
        for i, agent in enumerate(self.agents):
            for j, name in enumerate(agent.tools):
                if name not in known:
                    raise ConfigError(
                        f"agents[{i}].tools[{j}]: unknown tool {name!r} (registered: {sorted(known)})"
                    )


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(
    text: str, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> str:
    """`${VAR}` and `${VAR:-default}` from the environment, so one file serves laptop and
    containers (hostnames, ports). Secrets do not belong here: use `api_key_env`."""
    env = os.environ if environ is None else environ

    def sub(match: re.Match[str]) -> str:
        value = env.get(match.group(1), match.group(2))
        if value is None:
            raise ConfigError(f"{source}: environment variable {match.group(1)} is not set")
        return value

    return _VAR.sub(sub, text)


def parse(
    text: str, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> Deployment:
    """The deployment; `${VAR}`s from `environ` (default: this process's environment)."""
    try:
        data = yaml.safe_load(expand_env(text, source, environ))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return Deployment.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(
            ".[", "["
        )
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: {where + ': ' if where else ''}{msg}") from exc


def load(path: Path, environ: Mapping[str, str] | None = None) -> Deployment:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    return parse(text, str(path), environ)
