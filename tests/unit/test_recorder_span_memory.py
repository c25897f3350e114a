from __future__ import annotations

from beamline import spans
from services.recorder.span_memory import SpanMemory


def row(span_id: str) -> list[object]:
    out: list[object] = [""] * len(spans.COLUMNS)
    out[spans.COLUMNS.index("SpanId")] = span_id
    return out


def test_it_is_young_only_during_the_warmup() -> None:
    now = [100.0]
    memory = SpanMemory(warmup_s=60, clock=lambda: now[0])
    assert memory.young()
    now[0] = 161.0
    assert not memory.young()


def test_written_spans_and_task_starts_are_remembered_up_to_a_bound() -> None:
    memory = SpanMemory(size=2)
    memory.remember_written([row("a"), row("b"), row("c")])
    assert not memory.written("a") and memory.written("b") and memory.written("c")
    memory.remember_tasks({"t1": spans.TaskStart(1, ""), "t2": spans.TaskStart(2, "p")})
    assert memory.task_starts(["t1", "t2", "t3"]) == {
        "t1": spans.TaskStart(1, ""),
        "t2": spans.TaskStart(2, "p"),
    }
