"""Service lifecycle shared by every service: signals, health answers, graceful stop.

A service's `main(stop)` starts its work, awaits `stop`, then stops taking work, finishes
in-flight work (journal, then ack) and closes its clients. `beamline up` sends SIGTERM and
kills only after a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from beamline import log as logsetup
from beamline import subjects
from beamline.errors import ConfigError

StatusFn = Callable[[], dict[str, Any]]
logger = logging.getLogger("beamline.service")


async def answer_health(nc: NATS, service: str, status: StatusFn) -> Subscription:
    """Answer `bl.svc.<service>.health` with what the service is doing right now."""
    started = time.time()

    async def on_request(msg: Msg) -> None:
        body = {"service": service, "ok": True, "uptime_s": round(time.time() - started, 3)}
        body.update(status())
        await msg.respond(json.dumps(body, default=str).encode())

    return await nc.subscribe(subjects.health(service), queue=service, cb=on_request)


async def finish_then_cancel(
    task: asyncio.Task[Any] | None, finished: Callable[[], Awaitable[Any]], timeout: float
) -> None:
    """Stop a background writer: wait up to `timeout` seconds for `finished()` (what it
    holds is written), then cancel it. What is still unwritten then is given up."""
    if task is None:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await finished()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def every(
    interval_s: float,
    action: Callable[[], Awaitable[object]],
    failure: str,
    failed: Callable[[str], None],
) -> None:
    """Run `action` every `interval_s` seconds until cancelled: a service's periodic write
    or check. What it raises (NATS or KV unavailable for now) does not end the loop: it is
    told to `failed` as "`failure`: <error>" and logged, and the next tick tries again."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await action()
        except Exception as exc:
            failed(f"{failure}: {exc!r}")
            logger.warning(f"{failure}; the next tick tries again", exc_info=True)


def crash_on_error(task: asyncio.Task[Any]) -> None:
    """Done-callback for a service's long-running loops: a loop that dies of a bug takes the
    process down (exit 70) so its supervisor restarts it, instead of idling half-alive."""
    if task.cancelled() or task.exception() is None:
        return
    logger.error(
        "service loop crashed; exiting so the process is restarted",
        exc_info=task.exception(),
        extra={"loop": task.get_name()},
    )
    os._exit(70)


def run(
    service: str, main: Callable[[asyncio.Event], Awaitable[int | None]], level: str = "INFO"
) -> None:
    """Run `main` until SIGTERM/SIGINT; exit 2 with the reason on a configuration error,
    else with the code `main` returns (None: 0)."""
    logsetup.setup(service, level)

    async def runner() -> int | None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    try:
        code = asyncio.run(runner())
    except ConfigError as exc:
        logger.error("configuration rejected", extra={"service": service, "error": str(exc)})
        print(f"{service}: {exc}", file=sys.stderr)
        sys.exit(2)
    logger.info("stopped", extra={"service": service, "exit_code": code or 0})
    if code:
        sys.exit(code)
