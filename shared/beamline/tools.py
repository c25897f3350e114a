"""User tools: plain Python functions registered with `@tool`.

The JSON Schema an LLM sees is derived from the function's type hints, and the arguments an
LLM sends are validated against the same model before the function runs.

    from beamline import tool

    @tool
    def add(a: float, b: float) -> float:
        "Add two numbers."
        return a + b
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from pydantic import BaseModel, ValidationError, create_model

from beamline.envelope import ToolSpec
from beamline.errors import CallerError, ConfigError, Reason


class Crash(Exception):
    """Raise from a tool to crash the agent itself, not to report a failure to the LLM:
    "let it crash". A supervised agent's incarnation dies, and its supervisor restarts it
    from its journal; an unsupervised one retries, then dead-letters the message."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    arguments: type[BaseModel]
    func: Callable[..., Any]

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(
            name=self.name,
            description=self.description,
            parameters=self.arguments.model_json_schema(),
        )

    async def run(self, arguments_json: str) -> str:
        """Validate the LLM's arguments, run the function, return its result as text."""
        try:
            raw = json.loads(arguments_json or "{}")
            args = self.arguments.model_validate(raw)
        except (json.JSONDecodeError, ValidationError) as exc:
            raise CallerError(
                f"arguments for tool {self.name!r} are invalid: {exc}",
                Reason.INVALID_TOOL_ARGUMENTS,
            ) from exc
        kwargs = {field: getattr(args, field) for field in type(args).model_fields}
        if inspect.iscoroutinefunction(self.func):
            result = await self.func(**kwargs)
        else:
            # sync tools run on a thread so one slow tool cannot stall every agent on the host
            result = await asyncio.to_thread(self.func, **kwargs)
        return result if isinstance(result, str) else json.dumps(result, default=str)


_REGISTRY: dict[str, Tool] = {}


F = TypeVar("F", bound=Callable[..., Any])


@overload
def tool(func: F, *, name: str | None = None) -> F: ...
@overload
def tool(func: None = None, *, name: str | None = None) -> Callable[[F], F]: ...
def tool(func: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Register a function as a tool agents can call. Usable as `@tool` or `@tool(name=...)`."""

    def register(f: F) -> F:
        tool_name = name or f.__name__
        fields: dict[str, Any] = {}
        for pname, param in inspect.signature(f).parameters.items():
            if param.annotation is inspect.Parameter.empty:
                raise ConfigError(f"tool {tool_name!r}: parameter {pname!r} needs a type hint")
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[pname] = (param.annotation, default)
        model = create_model(f"{tool_name}_arguments", **fields)
        description = inspect.getdoc(f) or tool_name
        _REGISTRY[tool_name] = Tool(tool_name, description, model, f)
        return f

    return register(func) if func is not None else register


def get_tool(name: str) -> Tool:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CallerError(f"no tool named {name!r} is registered", Reason.UNKNOWN_TOOL) from None


def registered() -> dict[str, Tool]:
    return dict(_REGISTRY)


def import_tool_modules(modules: list[str]) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"tools_modules: cannot import {module!r}: {exc}") from exc
