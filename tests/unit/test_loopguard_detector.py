"""Loop detection as a pure function of a conversation's journal entries."""

from __future__ import annotations

import json
from typing import Any

from beamline.envelope import (
    ChatMessage,
    Envelope,
    Kind,
    LLMResponsePayload,
    ReplyPayload,
    TaskPayload,
    ToolCall,
    ToolResultPayload,
)
from beamline.guard import LoopGuard, LoopKind, Scope
from services.loopguard.detector import Watch, canonical_arguments, counted, observe

GUARD = LoopGuard()
TASK = Envelope(
    kind=Kind.TASK,
    sender="cli",
    recipient="a",
    conversation_id="c",
    payload=TaskPayload(prompt="q"),
)
LONG = "I will search the notes again to find the restart intensity of a supervisor."


def task(prompt: str = "q") -> Envelope:
    return TASK.model_copy(update={"id": f"task-{prompt}", "payload": TaskPayload(prompt=prompt)})


def tool(name: str = "search", arguments: object = None, n: int = 0) -> Envelope:
    args = json.dumps(arguments if arguments is not None else {"query": "x"})
    return TASK.child(
        ToolResultPayload(call_id=f"call-{n}", name=name, arguments=args, result="[]"),
        sender=f"tool.{name}",
        recipient="a",
    )


def output(text: str, calls: tuple[ToolCall, ...] = ()) -> Envelope:
    message = ChatMessage(role="assistant", content=text, tool_calls=calls)
    return TASK.child(
        LLMResponsePayload(request_id="r", provider="p", model="m", message=message),
        sender="gateway",
        recipient="a",
    )


def feed(
    entries: list[Envelope], guard: LoopGuard = GUARD, watch: Watch | None = None
) -> list[Any]:
    watch = watch if watch is not None else Watch()
    return [observe(guard, watch, e) for e in entries]


def test_the_third_identical_tool_call_is_a_loop_reported_once() -> None:
    found = feed([tool(n=1), tool(n=2), tool(n=3), tool(n=4), tool(n=5)])
    assert found[:2] == [None, None] and found[3:] == [None, None]
    loop = found[2]
    assert loop.kind is LoopKind.SAME_TOOL_CALL and loop.count == 3
    assert (loop.tool, loop.arguments) == ("search", '{"query":"x"}')
    # the counts start afresh: a loop that goes on is reported again after 3 more
    assert feed([tool(n=i) for i in range(6)])[5].count == 3


def test_different_arguments_or_tools_are_no_loop_and_key_order_does_not_matter() -> None:
    assert feed([tool(arguments={"query": str(i)}, n=i) for i in range(5)]) == [None] * 5
    assert feed([tool(name, n=i) for i, name in enumerate(["a", "b", "a", "b"])]) == [None] * 4
    same = [{"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1}, {"b": [1, 2], "a": 1}]
    assert feed([tool(arguments=a, n=i) for i, a in enumerate(same)])[2] is not None
    assert canonical_arguments('{ "b" : 1, "a": 2 }') == '{"a":2,"b":1}'
    assert canonical_arguments("not json ") == "not json"


def test_a_redelivered_entry_counts_once() -> None:
    first, second = tool(n=1), tool(n=2)
    assert feed([first, first, second, second, first]) == [None] * 5


def test_the_count_spans_a_conversations_tasks_unless_scoped_to_a_task() -> None:
    entries = [task("1"), tool(n=1), tool(n=2), task("2"), tool(n=3)]
    assert feed(entries)[-1] is not None
    assert feed(entries, LoopGuard(scope=Scope.TASK))[-1] is None


def test_near_identical_outputs_in_a_row_are_a_loop() -> None:
    variants = [LONG, LONG.replace("again", "once more"), LONG + "!"]
    found = feed([output(v) for v in variants])
    assert found[:2] == [None, None]
    assert found[2].kind is LoopKind.SIMILAR_OUTPUT and found[2].count == 3
    assert found[2].text.startswith("I will search")


def test_short_outputs_never_count_nor_break_a_run_and_a_different_one_breaks_it() -> None:
    # "ok" to many tasks is no loop
    assert feed([output("ok") for _ in range(5)]) == [None] * 5
    # a tool-call-only response between repeats does not hide them
    call = (ToolCall(id="1", name="search", arguments="{}"),)
    assert feed([output(LONG), output("", call), output(LONG), output(LONG)])[3] is not None
    other = "A completely different answer about budgets, prices and the ledger."
    assert feed([output(LONG), output(LONG), output(other), output(LONG)]) == [None] * 4


def test_each_kind_can_be_switched_off() -> None:
    off = LoopGuard(same_tool_calls=0, similar_outputs=0)
    assert feed([tool(n=i) for i in range(4)], off) == [None] * 4
    assert feed([output(LONG) for _ in range(4)], off) == [None] * 4
    strict = LoopGuard(similarity=1.0)
    assert feed([output(LONG), output(LONG + "!"), output(LONG)], strict) == [None] * 3


def test_entries_skipped_by_their_kind_header_would_have_changed_nothing() -> None:
    """The service skips entries `counted` rules out without decoding them: for every
    guard, counting only the rest finds the same loops as counting everything."""
    reply = TASK.child(ReplyPayload(task_id=TASK.id, text=LONG), sender="a", recipient="cli")
    entries = [
        task("1"),
        *(e for n in range(3) for e in (tool(n=n), output(LONG), reply)),
        task("2"),
        *(e for n in range(3, 7) for e in (output(LONG + "."), tool(n=n))),
    ]
    for guard in (
        GUARD,
        LoopGuard(scope=Scope.TASK),
        LoopGuard(same_tool_calls=0),
        LoopGuard(similar_outputs=0),
    ):
        everything = feed(entries, guard)
        assert any(everything), guard
        kept = [e for e in entries if counted(guard, e.kind.value)]
        assert len(kept) < len(entries)
        assert [loop for loop in feed(kept, guard) if loop] == [loop for loop in everything if loop]
    assert counted(GUARD, None)  # no header (an older writer): decoded and looked at
