"""Context windows (input + output tokens) of known models, for agents whose deployment file
does not give one (`models: [{provider, model, context_window}]`).

The table holds current Anthropic and OpenAI models and fakellm's own model name; a dated
snapshot (`claude-sonnet-4-5-20250929`, `gpt-4o-2024-08-06`) or an alias ending in
`-latest` takes the window of the longest name in the table it extends. A model not found
here needs `context_window` on its model choice or on its provider, or `beamline check`
refuses the file: a wrong guess would either waste the window or overflow it.
"""

from __future__ import annotations

from typing import Final

ANTHROPIC_WINDOW: Final = 200_000

KNOWN_WINDOWS: Final[dict[str, int]] = {
    # Anthropic (the standard window; the 1M-token beta must be asked for per request)
    "claude-opus-4-1": ANTHROPIC_WINDOW,
    "claude-opus-4": ANTHROPIC_WINDOW,
    "claude-sonnet-4-5": ANTHROPIC_WINDOW,
    "claude-sonnet-4": ANTHROPIC_WINDOW,
    "claude-haiku-4-5": ANTHROPIC_WINDOW,
    "claude-3-7-sonnet": ANTHROPIC_WINDOW,
    "claude-3-5-sonnet": ANTHROPIC_WINDOW,
    "claude-3-5-haiku": ANTHROPIC_WINDOW,
    "claude-3-haiku": ANTHROPIC_WINDOW,
    "claude-3-opus": ANTHROPIC_WINDOW,
    # OpenAI
    "gpt-5": 400_000,
    "gpt-5-mini": 400_000,
    "gpt-5-nano": 400_000,
    "gpt-5-chat-latest": 128_000,
    "gpt-4.1": 1_047_576,
    "gpt-4.1-mini": 1_047_576,
    "gpt-4.1-nano": 1_047_576,
    "gpt-4o": 128_000,
    "gpt-4o-mini": 128_000,
    "gpt-4-turbo": 128_000,
    "o1": 200_000,
    "o1-mini": 128_000,
    "o3": 200_000,
    "o3-mini": 200_000,
    "o4-mini": 200_000,
    # fakellm answers any model name; `fakellm` is the one it lists as its own
    "fakellm": 128_000,
}


def known_window(model: str) -> int | None:
    """The context window of `model` from the table, or None when it is not known."""
    if model in KNOWN_WINDOWS:
        return KNOWN_WINDOWS[model]
    extended = [name for name in KNOWN_WINDOWS if model.startswith(name + "-")]
    return KNOWN_WINDOWS[max(extended, key=len)] if extended else None
