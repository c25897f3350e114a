"""`beamline`: run the embedded mesh, submit tasks, read traces, run the demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from beamline import bus, client, config, query, reads, traceview
from beamline.errors import BeamlineError
from beamline.runtime import Mesh, RuntimeOptions
from beamline.settings import MeshSettings


def _mesh_options(args: argparse.Namespace) -> RuntimeOptions:
    return RuntimeOptions(
        nats_port=args.nats_port,
        monitor_port=args.monitor_port,
        fakellm=not args.no_fakellm,
        fakellm_port=args.fakellm_port,
        external_nats_url=os.environ.get("BEAMLINE_NATS_URL"),
    )


async def cmd_up(args: argparse.Namespace) -> int:
    mesh = Mesh(MeshSettings(), _mesh_options(args))
    try:
        await mesh.start()
        print(f"Beamline is up: NATS {mesh.nats_url}, logs in {mesh.log_dir}. Ctrl-C stops it.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("stopping: services drain first, then NATS…")
    finally:
        mesh.stop()
    return 0


async def cmd_submit(args: argparse.Namespace) -> int:
    settings = MeshSettings()
    subject = client.target_subject(config.load(settings.config), args.target)
    nc = await bus.connect(settings.nats_url, "beamline-cli")
    try:
        conversation = await client.submit(nc, subject, args.text, args.conversation)
        print(f"submitted to {subject}; conversation {conversation}")
        if not args.wait:
            print(f"await the reply on bl.reply.{conversation}")
            return 0
        reply = await client.await_reply(nc, conversation, args.timeout)
        print(
            json.dumps(reply.model_dump(mode="json"), indent=2)
            if args.json
            else client.reply_text(reply)
        )
        return 0 if reply.kind.value == "reply" else 1
    finally:
        await nc.close()


async def cmd_trace(args: argparse.Namespace) -> int:
    settings = MeshSettings()
    nc = await bus.connect(settings.nats_url, "beamline-cli")
    try:
        result = await query.query(nc, reads.TRACE_SQL, {"id": args.id})
    finally:
        await nc.close()
    rows = result.dicts()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(traceview.render(rows))
    return 0 if rows else 1


def cmd_check(args: argparse.Namespace) -> int:
    deployment = config.load(Path(args.file))
    deployment.check_tools()
    print(
        f"{args.file}: ok ({len(deployment.agents)} agents, {len(deployment.providers)} providers)"
    )
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    from beamline import demo

    return await demo.run(_mesh_options(args), Path(args.data_dir))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beamline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def mesh_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--nats-port", type=int, default=4222)
        sp.add_argument("--monitor-port", type=int, default=8222, help="NATS monitoring (HTTP)")
        sp.add_argument("--fakellm-port", type=int, default=8399)
        sp.add_argument("--no-fakellm", action="store_true", help="do not start fakellm")

    up = sub.add_parser("up", help="start the embedded mesh (NATS, services) until Ctrl-C")
    mesh_flags(up)
    s = sub.add_parser("submit", help="publish a task to a role or a named agent")
    s.add_argument("target", help="a role (bl.task.<role>) or an agent name (its inbox)")
    s.add_argument("text")
    s.add_argument("--wait", action="store_true", help="wait for the reply and print it")
    s.add_argument("--timeout", type=float, default=120.0)
    s.add_argument("--conversation", help="continue this conversation id")
    s.add_argument("--json", action="store_true")
    t = sub.add_parser("trace", help="a conversation, trace or envelope id as a causal tree")
    t.add_argument("id")
    t.add_argument("--json", action="store_true")
    c = sub.add_parser("check", help="validate a deployment file")
    c.add_argument("file")
    d = sub.add_parser("demo", help="run a small research team against fakellm and exit")
    mesh_flags(d)
    d.add_argument("--data-dir", default=".beamline/demo")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    handlers: dict[str, Any] = {
        "up": cmd_up,
        "submit": cmd_submit,
        "trace": cmd_trace,
        "check": cmd_check,
        "demo": cmd_demo,
    }
    try:
        result = handlers[args.command](args)
        code = asyncio.run(result) if asyncio.iscoroutine(result) else result
    except BeamlineError as exc:
        print(f"beamline {args.command}: {exc} [{exc.reason.value}]", file=sys.stderr)
        code = 2
    except (RuntimeError, TimeoutError) as exc:
        print(f"beamline {args.command}: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    sys.exit(code)
