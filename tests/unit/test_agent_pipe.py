"""The pipe from an isolated agent's process to its host: reports survive the trip, a
crash is described from what the process said, its exit code or signal, and its last
error line."""

from __future__ import annotations

import json
import signal

from beamline.control import AgentBeat, AgentState
from beamline.envelope import Envelope, Kind, TaskPayload
from services.agent.pipe import Report, describe_exit, error_line, holding, read_report
from services.agent.runner import Delivery


def task(prompt: str) -> Envelope:
    return Envelope(
        kind=Kind.TASK,
        sender="cli",
        recipient="solo",
        conversation_id="c1",
        payload=TaskPayload(prompt=prompt),
    )


def test_a_report_with_the_task_in_hand_survives_the_pipe() -> None:
    current, queued = holding([Delivery(task("a")), Delivery(task("b")), Delivery(task("c"))])
    beat = AgentBeat(agent="solo", state=AgentState.WAITING_ON_TOOL, step=2, tokens=40)
    assert current is not None
    report = Report(pid=42, beat=beat, current_id=current.id, current=current, queued=queued)
    line = report.line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert read_report(line) == report
    assert len(queued) == 2


def test_what_is_not_a_report_is_refused() -> None:
    assert read_report(b"hello from a stray print\n") is None
    assert read_report(b'{"pid": "not a pid"}\n') is None
    assert read_report(b'{"pid": 1, "surprise": 1}\n') is None


def test_an_unasked_exit_is_a_crash_named_by_code_signal_or_what_the_process_said() -> None:
    assert describe_exit(1, "crash: ValueError('x')", None) == "crash: ValueError('x')"
    assert describe_exit(1, None, None) == "crash: agent process exited with code 1"
    assert describe_exit(0, None, None) == "crash: agent process exited with code 0"
    assert (
        describe_exit(-signal.SIGKILL, None, "boom")
        == "crash: agent process killed by signal SIGKILL: boom"
    )
    assert describe_exit(-200, None, None) == "crash: agent process killed by signal 200"


def test_the_last_error_line_is_an_error_log_or_an_interpreter_dying_word() -> None:
    info = json.dumps({"level": "info", "msg": "isolated agent ready"})
    error = json.dumps(
        {"level": "error", "msg": "loop crashed", "exc": "Traceback...\nValueError: bad"}
    )
    assert error_line(info) is None and error_line("   \n") is None
    assert error_line(error) == "loop crashed: ValueError: bad"
    assert error_line("Fatal Python error: Segmentation fault\n") == (
        "Fatal Python error: Segmentation fault"
    )
