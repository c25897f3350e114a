"""fakellm's script: validation and the pure rule matching, without any server."""

from __future__ import annotations

import json

import pytest

from services.fakellm.neutral import (
    LLMRequest,
    Message,
    Reply,
    ReplyToolCall,
    ToolCall,
    ToolResult,
    Usage,
    tool_pairing_error,
)
from services.fakellm.script import (
    Script,
    ScriptError,
    ScriptState,
    decide,
    default_script,
    load_script,
)


def request(
    *messages: Message,
    system: str = "",
    model: str = "gpt-4o-mini",
    tools: tuple[str, ...] = (),
) -> LLMRequest:
    return LLMRequest("openai", model, system, messages, tools)


def user(text: str) -> Message:
    return Message("user", text)


def tool_turn(name: str, result: str, call_id: str = "call_1") -> tuple[Message, Message]:
    """An assistant tool call and its result."""
    call = Message("assistant", tool_calls=(ToolCall(call_id, name, "{}"),))
    return call, Message("tool", tool_results=(ToolResult(call_id, name, result),))


def rule_for(condition: str) -> Script:
    return load_script(
        f"""
rules:
  - name: hit
    match: {condition}
    respond: {{text: hit}}
default: {{text: miss}}
"""
    )


def pick(script: Script, req: LLMRequest, state: ScriptState | None = None) -> str | None:
    return decide(script, req, state or ScriptState()).rule


# -- conditions ----------------------------------------------------------------------------


def test_contains_is_case_insensitive_on_the_last_user_message() -> None:
    script = rule_for("{contains: Capital}")
    assert pick(script, request(user("What is the CAPITAL of France?"))) == "hit"
    assert pick(script, request(user("capital?"), Message("assistant", "x"), user("no"))) is None


def test_regex_searches_the_last_user_message() -> None:
    script = rule_for(r"{regex: '^\d+ \+ \d+$'}")
    assert pick(script, request(user("2 + 3"))) == "hit"
    assert pick(script, request(user("what is 2 + 3"))) is None


def test_system_contains_and_model() -> None:
    script = rule_for("{system_contains: researcher, model: m1}")
    assert pick(script, request(user("x"), system="You are a Researcher.", model="m1")) == "hit"
    assert pick(script, request(user("x"), system="You are a Researcher.", model="m2")) is None
    assert pick(script, request(user("x"), system="You are a writer.", model="m1")) is None


def test_last_role() -> None:
    call, result = tool_turn("search", "found")
    assert pick(rule_for("{last_role: tool}"), request(user("q"), call, result)) == "hit"
    assert pick(rule_for("{last_role: tool}"), request(user("q"))) is None
    assert pick(rule_for("{last_role: user}"), request(user("q"))) == "hit"
    assert pick(rule_for("{last_role: assistant}"), request(user("q"), call)) == "hit"


def test_tool_result_for_looks_at_the_trailing_tool_results_only() -> None:
    script = rule_for("{tool_result_for: search_notes}")
    call, result = tool_turn("search_notes", "notes")
    assert pick(script, request(user("q"), call, result)) == "hit"
    other_call, other_result = tool_turn("fetch", "page", "call_2")
    assert pick(script, request(user("q"), other_call, other_result)) is None
    later = request(user("q"), call, result, Message("assistant", "ok"), user("more"))
    assert pick(script, later) is None


def test_tool_result_for_sees_every_result_of_parallel_calls() -> None:
    calls = Message(
        "assistant", tool_calls=(ToolCall("a", "fetch", "{}"), ToolCall("b", "search", "{}"))
    )
    first = Message("tool", tool_results=(ToolResult("a", "fetch", "1"),))
    second = Message("tool", tool_results=(ToolResult("b", "search", "2"),))
    assert pick(rule_for("{tool_result_for: fetch}"), request(user("q"), calls, first, second))


def test_has_tools() -> None:
    assert pick(rule_for("{has_tools: true}"), request(user("q"), tools=("search",))) == "hit"
    assert pick(rule_for("{has_tools: true}"), request(user("q"))) is None
    assert pick(rule_for("{has_tools: false}"), request(user("q"))) == "hit"


def test_conditions_are_anded_and_an_empty_match_always_matches() -> None:
    script = rule_for("{contains: paris, model: m1, has_tools: false}")
    assert pick(script, request(user("Paris"), model="m1")) == "hit"
    assert pick(script, request(user("Paris"), model="m1", tools=("t",))) is None
    assert pick(rule_for("{}"), request(user("anything"))) == "hit"


# -- order, times, state -------------------------------------------------------------------

ORDERED = """
rules:
  - {name: first, match: {contains: a}, respond: {text: "1"}, times: 2}
  - {name: second, match: {contains: a}, respond: {text: "2"}}
  - {name: third, match: {contains: b}, respond: {text: "3"}}
"""


def test_first_match_wins_and_times_falls_through() -> None:
    script, state = load_script(ORDERED), ScriptState()
    picked = [pick(script, request(user("a")), state) for _ in range(4)]
    assert picked == ["first", "first", "second", "second"]
    assert pick(script, request(user("b")), state) == "third"
    assert pick(script, request(user("c")), state) is None
    assert state.counts == {0: 2, 1: 2, 2: 1}


def test_times_counts_only_calls_that_matched() -> None:
    script, state = load_script(ORDERED), ScriptState()
    for _ in range(3):
        pick(script, request(user("b")), state)
    assert pick(script, request(user("a")), state) == "first"


def test_reset_clears_the_counters() -> None:
    script, state = load_script(ORDERED), ScriptState()
    for _ in range(2):
        pick(script, request(user("a")), state)
    assert pick(script, request(user("a")), state) == "second"
    state.reset()
    assert pick(script, request(user("a")), state) == "first"


def test_a_rule_without_times_answers_forever_the_tool_call_loop() -> None:
    script = load_script(
        """
rules:
  - name: loop
    respond: {tool_calls: [{name: search_notes, arguments: {query: again}}]}
"""
    )
    state = ScriptState()
    for _ in range(50):
        decision = decide(script, request(user("q")), state)
        assert decision.rule == "loop"
        assert decision.reply.tool_calls == (ReplyToolCall("search_notes", {"query": "again"}),)


# -- responses -----------------------------------------------------------------------------


def test_placeholders_in_text_tool_arguments_and_json() -> None:
    script = load_script(
        """
rules:
  - {match: {model: text}, respond: {text: "you said {last_user}; tool said {last_tool_result}"}}
  - {match: {model: args}, respond: {tool_calls: [{name: s, arguments: {q: "{last_user}"}}]}}
  - {match: {model: json}, respond: {json: {echo: "{last_user}", n: [1, 2]}}}
"""
    )
    call, result = tool_turn("search", "42 °C")
    convo = (user("hot?"), call, result)
    text = decide(script, request(*convo, model="text"), ScriptState()).reply
    assert text == Reply(text="you said hot?; tool said 42 °C")
    args = decide(script, request(user("find {x}"), model="args"), ScriptState()).reply
    assert args.tool_calls == (ReplyToolCall("s", {"q": "find {x}"}),)
    as_json = decide(script, request(user("hi"), model="json"), ScriptState()).reply
    assert json.loads(as_json.text) == {"echo": "hi", "n": [1, 2]}


def test_default_answers_when_nothing_matches_and_the_builtin_echoes() -> None:
    decision = decide(default_script(), request(user("hello")), ScriptState())
    assert decision == type(decision)(None, Reply(text="echo: hello"), None)


def test_a_fault_only_rule_answers_with_the_default_text() -> None:
    script = load_script("rules: [{name: slow, fault: {latency_ms: 5}}]\ndefault: {text: ok}")
    decision = decide(script, request(user("x")), ScriptState())
    assert decision.rule == "slow"
    assert decision.reply.text == "ok"
    assert decision.fault is not None and decision.fault.latency_ms == 5
    assert decision.fault.kind is None


def test_fault_kinds() -> None:
    script = load_script(
        """
rules:
  - {match: {model: a}, fault: {status: 429, retry_after_s: 1}}
  - {match: {model: b}, fault: {hang: true}}
  - {match: {model: c}, fault: {hang_mid_stream: true}, respond: {text: x}}
  - {match: {model: d}, fault: {malformed: true}}
"""
    )
    kinds = []
    for model in "abcd":
        fault = decide(script, request(user("x"), model=model), ScriptState()).fault
        kinds.append(fault.kind if fault else None)
    assert kinds == ["status", "hang", "hang_mid_stream", "malformed"]


def test_unnamed_rules_are_named_by_position() -> None:
    script = load_script("rules: [{respond: {text: a}, match: {model: x}}, {respond: {text: b}}]")
    assert [rule.name for rule in script.rules] == ["rules[0]", "rules[1]"]


def test_usage_is_a_quarter_of_the_characters_rounded_up() -> None:
    call, result = tool_turn("s", "12345")  # 5 chars of tool result
    req = request(user("abcdefgh"), call, result, system="sys")  # 8 + 5 + 3 = 16
    assert Usage.of(req, Reply(text="abcde")) == Usage(4, 2)
    assert Usage.of(request(user("")), Reply(text="")) == Usage(1, 1)
    tool_reply = Reply(tool_calls=(ReplyToolCall("s", {"q": "x"}),))  # '{"q": "x"}' is 10
    assert Usage.of(req, tool_reply).output_tokens == 3


def test_tool_pairing_rules() -> None:
    call, result = tool_turn("s", "r")
    assert tool_pairing_error((user("q"), call, result)) is None
    assert "no tool result" in (tool_pairing_error((user("q"), call)) or "")
    assert "must follow" in (tool_pairing_error((user("q"), result)) or "")
    stray = Message("tool", tool_results=(ToolResult("other", None, "r"),))
    assert "unknown tool call id" in (tool_pairing_error((user("q"), call, stray)) or "")


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "rules: [{respond: {text: a, tool_calls: [{name: t}]}}]",
            "rules[0].respond: exactly one of text, tool_calls, json",
        ),
        ("rules: [{respond: {}}]", "rules[0].respond: exactly one of"),
        ("rules: [{respond: {text: a}, colour: red}]", "rules[0].colour: unknown key"),
        ("rules: [{match: {contain: a}, respond: {text: a}}]", "rules[0].match.contain: unknown"),
        ("rules: [{match: {regex: '('}, respond: {text: a}}]", "rules[0].match.regex: not a valid"),
        ("rules: [{match: {last_role: system}, respond: {text: a}}]", "rules[0].match.last_role"),
        ("rules: [{match: {}}]", "rules[0]: a rule needs respond or fault"),
        ("rules: [{respond: {text: a}, times: 0}]", "rules[0].times"),
        ("rules: [{fault: {status: 200}}]", "rules[0].fault.status"),
        ("rules: [{fault: {hang: true, malformed: true}}]", "rules[0].fault: at most one"),
        ("rules: [{fault: {retry_after_s: 1}}]", "rules[0].fault: retry_after_s and message need"),
        ("rules: [{respond: {tool_calls: []}}]", "rules[0].respond.tool_calls"),
        ("rules: [{respond: {tool_calls: [{arguments: {}}]}}]", "tool_calls[0].name"),
        ("default: {text: a, json: 1}", "default: exactly one of"),
        ("rule: []", "rule: unknown key"),
        (
            "rules: [{name: a, respond: {text: x}}, {name: a, respond: {text: y}}]",
            "rules[1].name: duplicate rule name 'a'",
        ),
        ("rules: [", "script: not valid YAML"),
        ("- a\n- b", "script: must be a mapping"),
    ],
)
def test_validation_errors_name_the_field(text: str, expected: str) -> None:
    with pytest.raises(ScriptError) as info:
        load_script(text)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_an_empty_script_is_the_echo_script() -> None:
    assert load_script("") == default_script()
    assert load_script("rules: []").default.text == "echo: {last_user}"


def test_json_null_is_a_valid_json_answer() -> None:
    script = load_script("default: {json: null}")
    assert decide(script, request(user("x")), ScriptState()).reply.text == "null"
