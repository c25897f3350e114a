"""A container healthcheck for a Beamline service: `python -m beamline.health <service>`.

It connects as the service's own NATS user (BEAMLINE_NATS_URL, BEAMLINE_NATS_USER and
BEAMLINE_NATS_PASSWORD: the container's environment), asks `bl.svc.<service>.health` and
exits 0 when the answer says `ok`, 1 otherwise, with one line saying why. The whole check
fits in `--timeout` seconds (default 2), under the compose healthcheck's own timeout.

The request is published by the service's user and answered into that user's inbox, so its
role needs publish rights on `bl.svc.<service>.health` (the service already subscribes
there). When the server refuses that publish, the check says so and names the grant,
instead of reporting a silent timeout.

One subject per service, answered by a queue group: with several instances of a service
(two supervisors), whichever instance the server picks answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from beamline import bus, nats_credentials, subjects
from beamline.errors import BeamlineError
from beamline.settings import MeshSettings

DEFAULT_TIMEOUT_S = 2.0
# how long of the budget goes to connecting at most; the request gets the rest
_CONNECT_SHARE = 0.6


@dataclass(frozen=True)
class Verdict:
    ok: bool
    line: str  # what the check prints: the service's state, or why it is not healthy


def judge(service: str, answer: dict[str, Any]) -> Verdict:
    """What a health answer means (pure)."""
    if answer.get("ok") is True:
        uptime = answer.get("uptime_s")
        return Verdict(True, f"{service}: ok" + (f" (up {uptime} s)" if uptime is not None else ""))
    problem = answer.get("error") or answer.get("last_error") or "no error given"
    return Verdict(False, f"{service}: answered not ok: {problem}")


def denied(error: Exception | None, subject: str) -> bool:
    """Whether the server refused this client's publish to `subject` (nats-py keeps the
    server's -ERR as the connection's last error)."""
    text = str(error or "").lower()  # nats-py lowercases the server's text
    return "permissions violation" in text and f'publish to "{subject.lower()}"' in text


async def check(service: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Verdict:
    subject = subjects.health(service)
    settings = MeshSettings()
    _, who = nats_credentials.resolve(settings.nats_url)
    user = who.user if who else "(no user)"
    deadline = time.monotonic() + timeout_s
    try:
        nc = await bus.connect(
            settings.nats_url, f"health:{service}", give_up_s=timeout_s * _CONNECT_SHARE
        )
    except BeamlineError as exc:
        return Verdict(False, f"{service}: cannot connect: {exc}")
    try:
        return await _ask(nc, service, subject, user, max(0.1, deadline - time.monotonic()))
    finally:
        await nc.close()


async def _ask(nc: NATS, service: str, subject: str, user: str, timeout_s: float) -> Verdict:
    try:
        msg = await nc.request(subject, b"", timeout=timeout_s)
    except NoRespondersError:
        return Verdict(False, f"{service}: nothing answers {subject}: is the service running?")
    except (TimeoutError, NatsTimeoutError):
        if denied(nc.last_error, subject):
            return Verdict(
                False,
                f"{service}: NATS refused user {user!r} publishing to {subject}: that user's "
                f"role lacks the publish grant {subject!r} (shared/beamline/nats_auth.py)",
            )
        return Verdict(False, f"{service}: no answer on {subject} within {timeout_s:.1f} s")
    try:
        answer = json.loads(msg.data)
    except ValueError:
        return Verdict(False, f"{service}: the answer on {subject} is not JSON")
    if not isinstance(answer, dict):
        return Verdict(False, f"{service}: the answer on {subject} is not a JSON object")
    return judge(service, answer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m beamline.health",
        description="Exit 0 when a Beamline service answers its health request with ok.",
    )
    parser.add_argument("service", help="the service's health name: agent, gateway, ...")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # the verdict line says everything
    try:
        subjects.token(args.service, "service")
    except BeamlineError as exc:
        parser.error(str(exc))
    verdict = asyncio.run(check(args.service, args.timeout))
    print(verdict.line, file=sys.stdout if verdict.ok else sys.stderr)
    sys.exit(0 if verdict.ok else 1)


if __name__ == "__main__":
    main()
