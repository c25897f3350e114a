"""What the recorder remembers between batches so that spans cost no extra queries in the
common case.

- Task starts: an `invoke_agent` span needs its task's start, usually recorded a batch or
  two before the reply. Remembering recent tasks saves a lookup per outcome.
- Spans written: every outcome (reply/error) is recorded twice, from the journal and from
  the replies stream. Remembering the spans this process wrote makes the second copy free.
- A span this process has not written is looked up only while the process is young (its
  predecessor may have written it just before dying) or when the batch holds redeliveries.
  Past that, a second copy can only come from a stream lagging minutes behind another; it
  then leaves a second physical row that ReplacingMergeTree collapses (reads use FINAL),
  the same policy as for an envelope recorded from two streams in `bl_messages`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from beamline import spans

_SPAN_ID = spans.COLUMNS.index("SpanId")


class _Lru(OrderedDict[str, spans.TaskStart | None]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: str, value: spans.TaskStart | None = None) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class SpanMemory:
    def __init__(
        self,
        size: int = 200_000,
        warmup_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tasks = _Lru(size)
        self._written = _Lru(size)
        self._clock = clock
        self._young_until = clock() + warmup_s

    def young(self) -> bool:
        return self._clock() < self._young_until

    def remember_tasks(self, tasks: Mapping[str, spans.TaskStart]) -> None:
        for task_id, start in tasks.items():
            self._tasks.put(task_id, start)

    def task_starts(self, task_ids: Iterable[str]) -> dict[str, spans.TaskStart]:
        return {t: s for t in task_ids if (s := self._tasks.get(t)) is not None}

    def written(self, span_id: str) -> bool:
        return span_id in self._written

    def remember_written(self, span_rows: Iterable[list[object]]) -> None:
        for row in span_rows:
            self._written.put(str(row[_SPAN_ID]))
