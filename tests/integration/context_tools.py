"""A tool whose outputs fill a small context window fast, for the context-pressure scenarios
(tests/integration/test_context_pressure.py)."""

from __future__ import annotations

from beamline.tools import tool

PAGE_CHARS = 1200  # about 300 tokens by the shared estimate (4 characters a token)


@tool
def read_page(n: int) -> str:
    """Read page n of the long report."""
    head = f"page {n} of the report: "
    line = f"finding {n} is that the measured value was {n * 7} units. "
    return (head + line * (PAGE_CHARS // len(line) + 1))[:PAGE_CHARS]
