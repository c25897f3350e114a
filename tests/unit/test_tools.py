from __future__ import annotations

import json

import pytest

from beamline import demo_tools  # noqa: F401 - registers the demo tools
from beamline.errors import CallerError, Reason
from beamline.tools import get_tool, tool


@tool(name="test_add")
def add(a: float, b: float = 1.0) -> float:
    """Add two numbers."""
    return a + b


async def test_a_decorated_function_becomes_a_tool_with_a_json_schema() -> None:
    t = get_tool("test_add")
    assert t.spec.description == "Add two numbers."
    assert t.spec.parameters["required"] == ["a"]
    assert await t.run('{"a": 2, "b": 3}') == "5.0"


@pytest.mark.parametrize("arguments", ["not json", '{"b": 1}', '{"a": "x"}'])
async def test_invalid_arguments_are_refused_before_the_function_runs(arguments: str) -> None:
    with pytest.raises(CallerError) as info:
        await get_tool("test_add").run(arguments)
    assert info.value.reason is Reason.INVALID_TOOL_ARGUMENTS


def test_an_unknown_tool_is_a_caller_error() -> None:
    with pytest.raises(CallerError) as info:
        get_tool("nope")
    assert info.value.reason is Reason.UNKNOWN_TOOL


async def test_the_calculator_is_exact_and_refuses_code() -> None:
    calc = get_tool("calculator")
    assert await calc.run('{"expression": "(2 + 3) * 4 / 8"}') == "2.5"
    for bad in ["__import__('os')", "2 ** 99999", "a + 1"]:
        with pytest.raises(ValueError):
            await calc.run(json.dumps({"expression": bad}))


async def test_search_notes_finds_the_relevant_section() -> None:
    result = await get_tool("search_notes").run('{"query": "circuit breaker half-open"}')
    assert "Circuit breakers" in result
