"""`beamline db migrate` as a real subprocess against a throwaway chDB path (the test
process itself never opens chDB: one engine per process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BEAMLINE = str(Path(sys.executable).parent / "beamline")

HOLD = """
import sys
from beamline import storage
client = storage.connect(sys.argv[1])
client.query("SELECT 1")
print("ready", flush=True)
sys.stdin.read()  # hold the engine until the test closes our stdin
"""


def migrate(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BEAMLINE, "db", "migrate"],
        env={**os.environ, "BEAMLINE_CLICKHOUSE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_migrate_applies_the_schema_once_then_nothing(tmp_path: Path) -> None:
    url = f"chdb://{tmp_path / 'ch'}"
    first = migrate(url)
    assert first.returncode == 0, first.stderr
    assert "applied 1 001_messages.sql" in first.stdout
    second = migrate(url)
    assert second.returncode == 0, second.stderr
    assert "nothing applied" in second.stdout and "applied 1" not in second.stdout


def test_migrate_says_so_when_another_process_holds_the_embedded_engine(tmp_path: Path) -> None:
    url = f"chdb://{tmp_path / 'ch'}"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        held = migrate(url)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert held.returncode == 2, held.stdout + held.stderr
    assert "open in another process" in held.stderr
    assert "Stop the mesh" in held.stderr and "let the recorder migrate" in held.stderr
    # once the holder is gone, the same path migrates
    assert migrate(url).returncode == 0
