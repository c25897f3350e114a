"""`python -m services.fakellm`: serve the scripted LLM provider until SIGTERM.

Exit codes: 0 after SIGTERM/SIGINT, 2 for a bad setting or script (one line on stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import Generator
from pathlib import Path

import uvicorn
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from beamline import service
from beamline.errors import ConfigError
from services.fakellm.app import create_app
from services.fakellm.script import Script, ScriptError, default_script, load_script

ENV_PREFIX = "BEAMLINE_FAKELLM_"
logger = logging.getLogger("beamline.fakellm")


class FakeLLMSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = Field(default="127.0.0.1", description="Interface to bind.")
    port: int = Field(default=8399, ge=0, le=65535, description="TCP port to bind.")
    script: Path | None = Field(
        default=None, description="Script YAML; unset: no rules, echo the last user message."
    )


def configure() -> tuple[FakeLLMSettings, Script]:
    """Settings from the environment and the script they name; ConfigError if unusable."""
    try:
        settings = FakeLLMSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ENV_PREFIX + "_".join(str(part) for part in first["loc"]).upper()
        raise ConfigError(f"{name}: {first['msg']}") from None
    if settings.script is None:
        return settings, default_script()
    try:
        text = settings.script.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{ENV_PREFIX}SCRIPT: cannot read {settings.script}: {exc}") from None
    try:
        return settings, load_script(text)
    except ScriptError as exc:
        raise ConfigError(f"{settings.script}: {exc}") from None


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `beamline.service.run` owns SIGTERM/SIGINT."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()


async def serve(settings: FakeLLMSettings, script: Script, stop: asyncio.Event) -> None:
    shutdown = asyncio.Event()
    config = uvicorn.Config(
        create_app(script, shutdown=shutdown),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=3,
    )
    server = _Server(config)

    async def run_server() -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn's way to fail at startup, e.g. the port is taken
            where = f"{settings.host}:{settings.port}"
            raise ConfigError(f"{ENV_PREFIX}PORT: cannot listen on {where}") from None

    async def announce() -> None:
        await server.listening.wait()
        logger.info(
            "listening",
            extra={
                "host": settings.host,
                "port": settings.port,
                "script": str(settings.script or "(built-in echo)"),
                "rules": len(script.rules),
            },
        )

    serving = asyncio.create_task(run_server())
    stopping = asyncio.create_task(stop.wait())
    announcing = asyncio.create_task(announce())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    shutdown.set()  # hung requests end now instead of holding up the graceful stop
    server.should_exit = True
    stopping.cancel()
    announcing.cancel()
    await serving


def main() -> None:
    try:
        settings, script = configure()
    except ConfigError as exc:
        print(f"fakellm: {exc}", file=sys.stderr)
        sys.exit(2)
    service.run("fakellm", lambda stop: serve(settings, script, stop), level="INFO")


if __name__ == "__main__":
    main()
