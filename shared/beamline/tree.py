"""The supervision tree, declared in the deployment file next to the agents it supervises.

A flat top-level `supervisors:` list; nesting is by name, so each supervisor reads on its
own and a tree of any depth stays a list of short blocks. Exactly one supervisor is the
root (nobody's child). Children are listed in start order and name an agent or a
supervisor:

    hosts:                                  # optional; enables placement checks
      - {name: hot-1, labels: {tier: hot}}
    supervisors:
      - name: team
        strategy: one_for_one               # one_for_all | rest_for_one | simple_one_for_one
        intensity: 3                        # at most 3 restarts ...
        period: 10                          # ... within 10 s, else give up and escalate
        children:
          - {supervisor: analysis}
          - {agent: writer, restart: transient, shutdown: 10}
      - name: analysis
        strategy: rest_for_one
        children:
          - {agent: researcher}
          - {agent: analyst, placement: {tier: hot}}

Defaults follow OTP: `intensity: 1`, `period: 5`, `restart: permanent`; `shutdown` is 5 s
for an agent and `infinity` for a supervisor (its own children's timeouts bound it).
Agents that no supervisor names run unsupervised, as before.

A `simple_one_for_one` supervisor is a pool, as in OTP: exactly one child spec, an agent,
the template; it starts with no children, and `start_child` adds instances of the template
at run time (`beamline start-child POOL`), each named `<template>-<suffix>` and addressed
like any agent. The template itself never runs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from beamline.budget import Budget
from beamline.ids import is_token

BRUTAL_KILL: Literal["brutal_kill"] = "brutal_kill"
INFINITY: Literal["infinity"] = "infinity"
Shutdown = float | Literal["brutal_kill", "infinity"]
WORKER_SHUTDOWN_S = 5.0


class Strategy(StrEnum):
    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"
    SIMPLE_ONE_FOR_ONE = "simple_one_for_one"


class Restart(StrEnum):
    PERMANENT = "permanent"  # always restarted
    TRANSIENT = "transient"  # restarted only after an abnormal exit
    TEMPORARY = "temporary"  # never restarted


class ChildKind(StrEnum):
    """OTP's child type: an agent is a worker."""

    WORKER = "worker"
    SUPERVISOR = "supervisor"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Host(_Strict):
    name: str
    labels: dict[str, str] = Field(default_factory=dict)


class ChildSpec(_Strict):
    agent: str | None = None
    supervisor: str | None = None
    restart: Restart = Restart.PERMANENT
    shutdown: Shutdown | None = Field(
        default=None, description="Seconds to stop gracefully, or brutal_kill / infinity."
    )
    placement: dict[str, str] = Field(
        default_factory=dict, description="Labels a host must carry to run this agent."
    )

    @field_validator("shutdown", mode="before")
    @classmethod
    def _shutdown_is_timeout_or_atom(cls, value: Any) -> Any:
        ok_number = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
        if value is None or ok_number or value in (BRUTAL_KILL, INFINITY):
            return value
        raise ValueError(f"must be seconds >= 0, {BRUTAL_KILL!r} or {INFINITY!r}, not {value!r}")

    @model_validator(mode="after")
    def _names_one_agent_or_supervisor(self) -> ChildSpec:
        if (self.agent is None) == (self.supervisor is None):
            raise ValueError("a child names exactly one of `agent` or `supervisor`")
        if self.supervisor is not None and self.placement:
            raise ValueError("placement applies to agents; a supervisor runs in the supervisor")
        return self

    @property
    def id(self) -> str:
        """The child id within its supervisor: the name it refers to."""
        return self.agent if self.agent is not None else str(self.supervisor)

    @property
    def kind(self) -> ChildKind:
        return ChildKind.WORKER if self.agent is not None else ChildKind.SUPERVISOR

    @property
    def shutdown_or_default(self) -> Shutdown:
        if self.shutdown is not None:
            return self.shutdown
        return WORKER_SHUTDOWN_S if self.kind is ChildKind.WORKER else INFINITY


class SupervisorSpec(_Strict):
    name: str
    strategy: Strategy
    intensity: int = Field(default=1, ge=0, description="Restarts allowed within `period`.")
    period: float = Field(default=5.0, gt=0, description="Seconds of the restart window.")
    children: tuple[ChildSpec, ...] = ()
    budget: Budget | None = Field(
        default=None, description="What the whole subtree may spend (beamline.budget)."
    )

    @model_validator(mode="after")
    def _name_is_token(self) -> SupervisorSpec:
        if not is_token(self.name):
            raise ValueError("name must be 1-128 of A-Z a-z 0-9 _ -")
        return self


def check_tree(
    supervisors: Sequence[SupervisorSpec],
    agent_roles: Mapping[str, str],
    hosts: Sequence[Host] | None,
) -> None:
    """Cross-reference checks; raises ValueError naming the field. `agent_roles`: name -> role."""
    if hosts is not None:
        _unique([h.name for h in hosts], "hosts", "host name")
    names = [s.name for s in supervisors]
    _unique(names, "supervisors", "supervisor name")
    for i, name in enumerate(names):
        if name in agent_roles:
            raise ValueError(f"supervisors[{i}].name: {name!r} is already an agent's name")
    parent: dict[str, str] = {}
    for i, sup in enumerate(supervisors):
        _check_children(i, sup, set(names), agent_roles, parent)
        if sup.strategy is Strategy.SIMPLE_ONE_FOR_ONE:
            _check_pool(i, sup, agent_roles.keys())
        if hosts is not None:
            _check_placement(i, sup, hosts)
    _check_acyclic(supervisors)
    roots = [n for n in names if n not in parent]
    if len(roots) > 1:
        raise ValueError(
            f"supervisors: more than one root ({', '.join(roots)}); nest them under one supervisor"
        )


def _unique(names: Sequence[str], where: str, what: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{where}[{i}].name: duplicate {what} {name!r}")
        seen.add(name)


def _check_children(
    i: int,
    sup: SupervisorSpec,
    supervisor_names: set[str],
    agent_roles: Mapping[str, str],
    parent: dict[str, str],
) -> None:
    """Every child exists, appears once here, and has one parent across the whole tree."""
    ids: set[str] = set()
    for j, child in enumerate(sup.children):
        where = f"supervisors[{i}].children[{j}]"
        noun = "agent" if child.kind is ChildKind.WORKER else "supervisor"
        field = f"{where}.{noun}"
        known = agent_roles if child.kind is ChildKind.WORKER else supervisor_names
        if child.id not in known:
            raise ValueError(f"{field}: unknown {noun} {child.id!r} (declared: {sorted(known)})")
        if child.id in ids:
            raise ValueError(f"{where}: duplicate child id {child.id!r} in {sup.name!r}")
        ids.add(child.id)
        if child.id in parent:
            raise ValueError(
                f"{field}: {noun} {child.id!r} is already supervised by {parent[child.id]!r}"
            )
        parent[child.id] = sup.name


def _check_pool(i: int, sup: SupervisorSpec, agent_names: Collection[str]) -> None:
    """OTP's simple_one_for_one has one child spec that every child instantiates."""
    if len(sup.children) != 1 or sup.children[0].kind is not ChildKind.WORKER:
        raise ValueError(
            f"supervisors[{i}].children: a simple_one_for_one supervisor has exactly one child, "
            f"an agent: the template its children are started from (got {len(sup.children)})"
        )
    template = sup.children[0]
    if template.placement:
        raise ValueError(
            f"supervisors[{i}].children[0].placement: pool members live in the hosts' mailbox "
            f"shards; placement on a simple_one_for_one template is not supported"
        )
    clash = sorted(a for a in agent_names if pool_template(a, {template.id}) is not None)
    if clash:
        raise ValueError(
            f"supervisors[{i}].children[0].agent: declared agents {clash} are named like members "
            f"of the pool of {template.id!r} ({template.id}-<suffix>); rename them"
        )


def pool_template(name: str, templates: Collection[str]) -> str | None:
    """The pool template whose member `name` is (`<template>-<suffix>`), if any."""
    head = name
    while "-" in head:
        head = head.rsplit("-", 1)[0]
        if head in templates:
            return head
    return None


def member_name(template: str, suffix: str) -> str:
    name = f"{template}-{suffix}"
    if not is_token(name) or not suffix:
        raise ValueError(f"pool member name {name!r} must be 1-128 of A-Z a-z 0-9 _ -")
    return name


def _check_placement(i: int, sup: SupervisorSpec, hosts: Sequence[Host]) -> None:
    for j, child in enumerate(sup.children):
        need = child.placement
        if need and not any(need.items() <= h.labels.items() for h in hosts):
            raise ValueError(
                f"supervisors[{i}].children[{j}].placement: impossible placement {need}: "
                f"no declared host has these labels (hosts: {[h.name for h in hosts]})"
            )


def _check_acyclic(supervisors: Sequence[SupervisorSpec]) -> None:
    """Follow supervisor children depth-first; a name met again on the current path is a cycle."""
    index = {s.name: i for i, s in enumerate(supervisors)}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in done:
            return
        i = index[name]
        for j, child in enumerate(supervisors[i].children):
            if child.supervisor is None:
                continue
            here = [*path, name]
            if child.supervisor in here:
                cycle = " -> ".join([*here[here.index(child.supervisor) :], child.supervisor])
                raise ValueError(f"supervisors[{i}].children[{j}].supervisor: cycle {cycle}")
            visit(child.supervisor, here)
        done.add(name)

    for sup in supervisors:
        visit(sup.name, [])
