"""Keep API keys out of everything the gateway says: replies, events, logs, health.

Keys are read from the environment only. Providers are known to echo a key back in an error
body ("Incorrect API key provided: sk-..."), and exception texts can carry request details,
so every text that leaves the gateway passes through `Redactor.scrub` first.
"""

from __future__ import annotations

from collections.abc import Iterable

MASK = "[REDACTED]"
# Shorter "secrets" (an empty or placeholder variable) would mask ordinary words.
MIN_SECRET_LEN = 6
MAX_TEXT = 500


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= MIN_SECRET_LEN and secret not in self._secrets:
            self._secrets.append(secret)
            # longest first, so a key that contains another is masked whole
            self._secrets.sort(key=len, reverse=True)

    def scrub(self, text: str, limit: int = MAX_TEXT) -> str:
        """`text` with every known secret masked, cut to `limit` characters."""
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        if len(text) > limit:
            text = text[:limit] + "..."
        return text

    def describe(self, exc: BaseException) -> str:
        """A scrubbed one-line description of an exception (its type when it has no text)."""
        text = str(exc).strip()
        return self.scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
