"""A supervisor's state is built from the declared tree."""

from __future__ import annotations

from beamline import config
from beamline.tree import ChildKind, Strategy
from services.supervisor.state import SupervisorState
from tests.unit.test_tree import NESTED


def test_state_from_the_declared_tree_keeps_start_order_and_defaults() -> None:
    root_spec, pool_spec = config.parse(NESTED).supervisors
    root = SupervisorState.from_spec(root_spec)
    assert (root.name, root.strategy) == ("root", Strategy.ONE_FOR_ALL)
    assert (root.window.intensity, root.window.period, root.window.restarts) == (2, 10.0, ())
    assert [(c.id, c.kind, c.shutdown) for c in root.children] == [
        ("pool", ChildKind.SUPERVISOR, "infinity"),
        ("b", ChildKind.WORKER, 5.0),
        ("c", ChildKind.WORKER, "brutal_kill"),
    ]
    pool = SupervisorState.from_spec(pool_spec)
    assert pool.children == ()  # OTP: a simple_one_for_one pool starts empty
