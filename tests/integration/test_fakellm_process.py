"""fakellm's process lifecycle: bad settings exit 2, SIGTERM exits 0 even with hung calls."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from beamline.process import Process
from beamline.testing import free_port, start_service, wait_for

pytestmark = pytest.mark.timeout(30)


def start(tmp_path: Path, script: str | None, **env: str) -> tuple[Process, str]:
    port = free_port()
    full_env = {"BEAMLINE_FAKELLM_PORT": str(port), "PYTHONUNBUFFERED": "1", **env}
    if script is not None:
        (tmp_path / "script.yaml").write_text(script)
        full_env["BEAMLINE_FAKELLM_SCRIPT"] = str(tmp_path / "script.yaml")
    return start_service("fakellm", full_env, tmp_path / "logs"), f"http://127.0.0.1:{port}"


async def healthy(url: str) -> bool:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{url}/healthz", timeout=1)).status_code == 200


async def test_a_bad_script_exits_2_naming_the_field(tmp_path: Path) -> None:
    process, _ = start(tmp_path, "rules: [{respond: {text: a, tool_calls: [{name: t}]}}]")
    try:
        await wait_for(lambda: not process.alive(), timeout=15, what="fakellm to exit")
        assert process.popen.returncode == 2
        lines = process.logs().strip().splitlines()
        assert len(lines) == 1, lines
        assert "rules[0].respond: exactly one of text, tool_calls, json" in lines[0]
    finally:
        process.kill()


async def test_a_bad_setting_exits_2(tmp_path: Path) -> None:
    process, _ = start(tmp_path, None, BEAMLINE_FAKELLM_PORT="not-a-port")
    try:
        await wait_for(lambda: not process.alive(), timeout=15, what="fakellm to exit")
        assert process.popen.returncode == 2
        assert "BEAMLINE_FAKELLM_PORT" in process.logs()
    finally:
        process.kill()


async def test_builtin_echo_and_sigterm_with_a_hung_call_exits_0(tmp_path: Path) -> None:
    process, url = start(tmp_path, None)
    try:
        await wait_for(lambda: healthy(url), timeout=15, what="fakellm /healthz")
        body = {"model": "m", "messages": [{"role": "user", "content": "ping"}]}
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            echo = await client.post("/v1/chat/completions", json=body)
            assert echo.json()["choices"][0]["message"]["content"] == "echo: ping"
            hang = "rules: [{match: {model: m-hang}, fault: {hang: true}}]"
            (await client.put("/_fakellm/script", content=hang)).raise_for_status()
            hung = asyncio.create_task(
                client.post("/v1/chat/completions", json={**body, "model": "m-hang"})
            )

            async def hang_seen() -> bool:
                calls = (await client.get("/_fakellm/calls")).json()
                return any(c["rule"] == "rules[0]" for c in calls)

            await wait_for(hang_seen, timeout=5, what="the hung call to arrive")
            process.popen.send_signal(signal.SIGTERM)
            answer = await asyncio.wait_for(hung, timeout=10)
            assert answer.status_code == 503
        await wait_for(lambda: not process.alive(), timeout=10, what="fakellm to exit")
        assert process.popen.returncode == 0, process.logs()
    finally:
        process.kill()
