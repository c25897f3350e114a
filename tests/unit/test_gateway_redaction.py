"""Gateway key scrubbing: API keys never leave the gateway in any text."""

from __future__ import annotations

from services.gateway.redaction import MASK, Redactor

KEY = "sk-SENTINEL-123"


def test_a_key_is_masked_wherever_it_appears() -> None:
    r = Redactor([KEY])
    text = r.scrub(f"Incorrect API key provided: {KEY}. Retry with {KEY}!")
    assert KEY not in text and text.count(MASK) == 2


def test_exception_text_is_scrubbed_and_named() -> None:
    r = Redactor([KEY])
    described = r.describe(RuntimeError(f"header Authorization: Bearer {KEY}"))
    assert described.startswith("RuntimeError: ") and KEY not in described


def test_an_exception_without_text_is_described_by_its_type() -> None:
    assert Redactor().describe(TimeoutError()) == "TimeoutError"


def test_scrubbing_happens_before_truncation_so_no_key_prefix_survives() -> None:
    r = Redactor([KEY])
    text = r.scrub("x" * 95 + KEY, limit=100)
    assert "sk-SE" not in text


def test_a_key_containing_another_is_masked_whole() -> None:
    r = Redactor(["abcdef", "abcdef-long-key"])
    assert r.scrub("key abcdef-long-key") == f"key {MASK}"


def test_empty_or_tiny_values_are_not_treated_as_secrets() -> None:
    r = Redactor(["", "abc"])
    r.add(None)
    assert r.scrub("abc abc") == "abc abc"
