"""The agent's next step is a pure function of its journal: replaying a journal after a
crash must pick up exactly where it stopped, repeating nothing."""

from __future__ import annotations

from beamline.config import AgentSpec, ModelChoice
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
from beamline.errors import Reason
from services.agent import conversation as conv

SPEC = AgentSpec(name="a", role="r", models=(ModelChoice(provider="p", model="m"),), max_steps=3)
TASK = Envelope(
    kind=Kind.TASK,
    sender="cli",
    recipient="a",
    conversation_id="c",
    payload=TaskPayload(prompt="q"),
)


def llm(content: str | None = None, calls: tuple[ToolCall, ...] = ()) -> Envelope:
    message = ChatMessage(role="assistant", content=content, tool_calls=calls)
    return TASK.child(
        LLMResponsePayload(request_id="r", provider="p", model="m", message=message),
        sender="gateway",
        recipient="a",
    )


def result(call: ToolCall) -> Envelope:
    return TASK.child(
        ToolResultPayload(call_id=call.id, name=call.name, result="42"), sender="t", recipient="a"
    )


CALL_1 = ToolCall(id="c1", name="calculator", arguments="{}")
CALL_2 = ToolCall(id="c2", name="calculator", arguments="{}")


def test_a_fresh_task_calls_the_llm_with_a_deterministic_request_id() -> None:
    first = conv.next_action(SPEC, [TASK], TASK.id)
    again = conv.next_action(SPEC, [TASK], TASK.id)
    assert isinstance(first, conv.CallLLM) and first == again and first.index == 0


def test_tool_calls_run_only_where_no_result_is_journaled() -> None:
    asked = llm(calls=(CALL_1, CALL_2))
    action = conv.next_action(SPEC, [TASK, asked], TASK.id)
    assert isinstance(action, conv.RunTools) and action.calls == (CALL_1, CALL_2)
    action = conv.next_action(SPEC, [TASK, asked, result(CALL_1)], TASK.id)
    assert isinstance(action, conv.RunTools) and action.calls == (CALL_2,)
    action = conv.next_action(SPEC, [TASK, asked, result(CALL_1), result(CALL_2)], TASK.id)
    assert isinstance(action, conv.CallLLM) and action.index == 1


def test_a_final_answer_becomes_the_reply_and_a_journaled_reply_is_done() -> None:
    answer = llm("the answer")
    assert conv.next_action(SPEC, [TASK, answer], TASK.id) == conv.Reply("the answer")
    reply = TASK.child(ReplyPayload(task_id=TASK.id, text="x"), sender="a", recipient="cli")
    assert conv.next_action(SPEC, [TASK, answer, reply], TASK.id) == conv.Done(reply)


def test_too_many_llm_calls_fail_the_task() -> None:
    loop = [TASK]
    for _ in range(3):
        loop += [llm(calls=(CALL_1,)), result(CALL_1)]
    action = conv.next_action(SPEC, loop, TASK.id)
    assert isinstance(action, conv.Fail) and action.reason is Reason.MAX_STEPS


def test_json_agents_reject_answers_that_are_not_json() -> None:
    spec = SPEC.model_copy(update={"output": "json"})
    assert conv.next_action(spec, [TASK, llm('{"a": 1}')], TASK.id) == conv.Reply('{"a": 1}')
    action = conv.next_action(spec, [TASK, llm("sure! {a: 1}")], TASK.id)
    assert isinstance(action, conv.Fail) and action.reason is Reason.INVALID_LLM_OUTPUT


def test_the_llm_sees_the_whole_conversation_in_order() -> None:
    asked = llm(calls=(CALL_1,))
    messages = conv.chat_messages(SPEC, [TASK, asked, result(CALL_1)])
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[3].tool_call_id == "c1" and messages[3].content == "42"


def test_a_second_task_in_the_conversation_is_handled_on_its_own() -> None:
    second = TASK.model_copy(update={"id": "t2"})
    reply = TASK.child(ReplyPayload(task_id=TASK.id, text="x"), sender="a", recipient="cli")
    journal = [TASK, llm("x"), reply, second]
    assert isinstance(conv.next_action(SPEC, journal, TASK.id), conv.Done)
    action = conv.next_action(SPEC, journal, "t2")
    assert isinstance(action, conv.CallLLM) and action.index == 0
