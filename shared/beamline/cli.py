"""`beamline`: run the embedded mesh, submit tasks, read traces and logs, migrate the
schema, run the demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from beamline import (
    budget_ops,
    bus,
    client,
    config,
    escalation_ops,
    init,
    logview,
    nats_credentials,
    ops,
    query,
    reads,
    storage,
    traceview,
)
from beamline.budget import Budget
from beamline.errors import BeamlineError, CallerError, Reason, TransientError
from beamline.guard import OnTimeout
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


async def _connect(settings: MeshSettings) -> NATS:
    """Connect as the user BEAMLINE_NATS_USER or the URL names, else as the operator of the
    embedded mesh in the data directory. bus.connect retries forever, as services should; a
    CLI command gives up after 10 s and says why (no answer, or credentials refused)."""
    operator = nats_credentials.embedded_admin(settings)
    return await bus.connect(settings.nats_url, "beamline-cli", operator, give_up_s=10)


async def cmd_up(args: argparse.Namespace) -> int:
    mesh = Mesh(MeshSettings(), _mesh_options(args))
    try:
        await mesh.start()
        where = nats_credentials.without_credentials(mesh.nats_url)  # a password is never printed
        print(f"Beamline is up: NATS {where}, logs in {mesh.log_dir}. Ctrl-C stops it.")
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
    nc = await _connect(settings)
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
    nc = await _connect(settings)
    try:
        result = await query.trace(nc, args.id)
    finally:
        await nc.close()
    rows = result.dicts()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(traceview.render(rows))
    return 0 if rows else 1


async def cmd_logs(args: argparse.Namespace) -> int:
    params = logview.parameters(args.agent, args.since, args.kind, args.conversation, args.limit)
    nc = await _connect(MeshSettings())
    try:
        result = await query.query(nc, reads.LOGS_SQL, params)
    finally:
        await nc.close()
    rows = result.dicts()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    elif rows:
        print(logview.render(rows))
    else:
        print("(no recorded messages match)", file=sys.stderr)
    return 0


_CHDB_HELD = (
    "the embedded ClickHouse at {path} is open in another process (the recorder of a "
    "running mesh?): chDB opens a path in one process only. Stop the mesh and run this "
    "again, or let the recorder migrate: it applies the schema each time it starts"
)


def _chdb_path(url: str) -> str | None:
    """The engine directory of a `chdb://PATH` URL, as `storage.connect` resolves it."""
    if not url.lower().startswith("chdb://"):
        return None
    location = unquote(url[len("chdb://") :].split("?", 1)[0])
    return None if location in ("", "memory", ":memory:") else os.path.realpath(location)


def _chdb_held(path: str) -> bool:
    """True when another process holds the engine's lock (ClickHouse flocks PATH/status)."""
    try:
        fd = os.open(os.path.join(path, "status"), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the lock we may have taken
    return False


def cmd_db_migrate(args: argparse.Namespace) -> int:
    url = MeshSettings().resolved_clickhouse_url
    path = _chdb_path(url)
    if path and _chdb_held(path):
        raise TransientError(_CHDB_HELD.format(path=path), Reason.STORAGE_UNAVAILABLE)
    try:
        ch = storage.connect(url)
    except DatabaseError as exc:  # chDB refuses to open the engine
        if path:
            raise TransientError(
                _CHDB_HELD.format(path=path) + f" ({exc})", Reason.STORAGE_UNAVAILABLE
            ) from exc
        raise
    try:
        migrated = storage.migrate(ch)
    except ClickHouseError as exc:
        raise TransientError(
            f"migrating {storage.redact_url(url)} failed: {exc}", storage.classify(exc)
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            ch.close()
    where = storage.redact_url(url)
    for m in migrated.applied:
        print(f"{where}: applied {m.version} {m.name}")
    if not migrated.applied:
        print(f"{where}: schema up to date (version {migrated.version}); nothing applied")
    for change in migrated.retention:
        print(
            f"{where}: {change.table} TTL {change.after or 'removed: rows are kept forever'}"
            f" (was {change.before or 'none'})"
        )
    return 0


async def cmd_init(args: argparse.Namespace) -> int:
    """The init job: the JetStream layout, then the ClickHouse schema (`db migrate`)."""
    settings = MeshSettings()
    where = nats_credentials.without_credentials(settings.nats_url)
    for declared in await init.declare_layout(settings, args.timeout):
        print(f"{where}: {declared.kind} {declared.name} R{declared.replicas}")
    try:
        return cmd_db_migrate(args)
    except (BeamlineError, RuntimeError):
        raise
    except Exception as exc:  # e.g. a server refusing the user: name the step, not a traceback
        url = storage.redact_url(settings.resolved_clickhouse_url)
        raise TransientError(
            f"applying the ClickHouse schema to {url} failed: {type(exc).__name__}: {exc}",
            Reason.STORAGE_UNAVAILABLE,
        ) from exc


def _flag(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type` that shows the parser's own message (argparse hides a ValueError's)."""

    def checked(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return checked


def cmd_check(args: argparse.Namespace) -> int:
    deployment = config.load(Path(args.file))
    deployment.check_tools()
    print(
        f"{args.file}: ok ({len(deployment.agents)} agents, {len(deployment.providers)} providers)"
    )
    return 0


async def cmd_ops(args: argparse.Namespace) -> int:
    """ps, tree, inspect, kill, restart: asked of the leading supervisor."""
    nc = await _connect(MeshSettings())
    command = args.command.replace("-", "_")  # start-child -> bl.admin.start_child
    try:
        result = await ops.admin(
            nc,
            command,
            getattr(args, "target", None),
            suffixes=tuple(getattr(args, "suffixes", None) or ()),
            count=getattr(args, "count", None) or 0,
        )
    finally:
        await nc.close()
    if getattr(args, "json", False) or command in ("start_child", "terminate_child"):
        print(json.dumps(result, indent=2, default=str))
    elif args.command == "ps":
        print(ops.render_ps(result))
    elif args.command == "tree" or "children" in result:
        print(ops.render_tree(result))
    else:
        print(ops.render_inspect(result))
    return 0


async def cmd_budget(args: argparse.Namespace) -> int:
    """show: spend, holds and limits; raise: higher limits, recorded, the subtree restarted."""
    limit = None
    if args.budget_command == "raise":
        try:
            limit = Budget(tokens=args.tokens, usd=args.usd)
        except ValidationError as exc:  # none given, or a negative one
            err = exc.errors()[0]
            where = "--" + ".".join(str(p) for p in err["loc"]) if err["loc"] else "--tokens/--usd"
            msg = err["msg"].removeprefix("Value error, ")
            raise CallerError(f"budget raise {where}: {msg}") from None
    nc = await _connect(MeshSettings())
    try:
        if limit is None:
            result = await budget_ops.show(nc, args.target)
        else:
            result = await budget_ops.raise_budget(nc, args.target, limit)
    finally:
        await nc.close()
    if args.json or args.budget_command == "raise":
        print(json.dumps(result, indent=2, default=str))
    else:
        print(budget_ops.render(result["accounts"]))
    return 0


async def cmd_escalation(args: argparse.Namespace) -> int:
    """list: the loop guard's open escalations; answer: resume (with advice) or stop."""
    nc = await _connect(MeshSettings())
    try:
        if args.escalation_command == "list":
            found = await escalation_ops.list_escalations(nc, args.agent, args.all)
            print(json.dumps(found, indent=2) if args.json else escalation_ops.render(found))
            return 0
        action = OnTimeout.STOP if args.stop else OnTimeout.RESUME
        if args.say and args.stop:
            raise CallerError("escalation answer: --say goes with --resume (advice for the agent)")
        result = await escalation_ops.answer(nc, args.id, action, args.say)
    finally:
        await nc.close()
    print(json.dumps(result, indent=2, default=str))
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
    lg = sub.add_parser("logs", help="recorded messages, newest last, one line each")
    lg.add_argument("--agent", type=_flag(logview.parse_name), help="sender or recipient")
    lg.add_argument("--since", type=_flag(logview.parse_since), help="30s, 10m, 2h, 1d")
    lg.add_argument("--kind", type=_flag(logview.parse_kind), help=", ".join(logview.KINDS))
    lg.add_argument("--conversation", type=_flag(logview.parse_name))
    lg.add_argument(
        "--limit", type=_flag(logview.parse_limit), default=100, help="1..10000 (default 100)"
    )
    lg.add_argument("--json", action="store_true", help="the rows as a JSON array")
    db = sub.add_parser("db", help="the ClickHouse schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser(
        "migrate",
        help="apply infra/clickhouse/*.sql not yet applied, then the retention TTLs "
        "(BEAMLINE_RETENTION_BL_MESSAGES_DAYS, default 90; BEAMLINE_RETENTION_OTEL_TRACES_DAYS, "
        "default 30; 0 keeps rows forever) to BEAMLINE_CLICKHOUSE_URL (default "
        "chdb://DATA_DIR/clickhouse); refuses when an applied file has changed",
    )
    i = sub.add_parser(
        "init",
        help="the one-shot init job: declare the JetStream streams and buckets "
        "(BEAMLINE_STREAM_REPLICAS replicas each, default 1), then apply the ClickHouse schema "
        "as `db migrate` does; idempotent; exits non-zero naming the step that failed",
    )
    i.add_argument(
        "--timeout",
        type=float,
        default=init.DEFAULT_GIVE_UP_S,
        help="seconds to wait for NATS and JetStream (default 30)",
    )
    c = sub.add_parser("check", help="validate a deployment file")
    c.add_argument("file")
    for command, text in (
        ("ps", "every agent: supervisor, host, state, mailbox depth, step, restarts, tokens"),
        ("tree", "the supervision tree with live states"),
    ):
        sub.add_parser(command, help=text).add_argument("--json", action="store_true")
    for command, text in (
        ("inspect", "one agent: its state, current message, queue and latest steps"),
        ("kill", "kill a supervised agent (its supervisor decides what follows); recorded"),
        ("restart", "restart an agent or a whole supervisor subtree; recorded"),
    ):
        op = sub.add_parser(command, help=text)
        op.add_argument("target", help="an agent (or, for restart/inspect, a supervisor)")
        op.add_argument("--json", action="store_true")
    sc = sub.add_parser(
        "start-child",
        help="start members of a simple_one_for_one pool: named <template>-<suffix>; recorded",
    )
    sc.add_argument("target", metavar="POOL", help="the simple_one_for_one supervisor")
    sc.add_argument("suffixes", nargs="*", metavar="SUFFIX", help="member name suffixes")
    sc.add_argument("--count", type=int, help="or: this many, numbered after the highest")
    tc = sub.add_parser(
        "terminate-child", help="stop a pool member and remove it from its pool; recorded"
    )
    tc.add_argument("target", metavar="AGENT")
    tc.add_argument("--json", action="store_true")
    b = sub.add_parser("budget", help="token and cost budgets: show spend, raise a limit")
    b_sub = b.add_subparsers(dest="budget_command", required=True)
    bs = b_sub.add_parser("show", help="every budgeted account, or one agent or supervisor")
    bs.add_argument("target", nargs="?", help="an agent or supervisor")
    bs.add_argument("--json", action="store_true")
    br = b_sub.add_parser(
        "raise", help="raise an agent's or supervisor's limits; recorded; restarts it if stopped"
    )
    br.add_argument("target", help="an agent or supervisor")
    br.add_argument("--tokens", type=int, help="the new token limit (input + output)")
    br.add_argument("--usd", type=float, help="the new cost limit in USD")
    br.add_argument("--json", action="store_true")
    e = sub.add_parser("escalation", help="the loop guard's questions to humans: list, answer")
    e_sub = e.add_subparsers(dest="escalation_command", required=True)
    el = e_sub.add_parser("list", help="open escalations: which agent looped, on what, until when")
    el.add_argument("--agent", help="only this agent's")
    el.add_argument("--all", action="store_true", help="closed ones too (the latest 100)")
    el.add_argument("--json", action="store_true")
    ea = e_sub.add_parser(
        "answer", help="resume the suspended agent (with advice) or stop it; recorded"
    )
    ea.add_argument("id", help="the escalation id (esc-...)")
    which = ea.add_mutually_exclusive_group(required=True)
    which.add_argument("--resume", action="store_true", help="start it again")
    which.add_argument("--stop", action="store_true", help="keep it stopped")
    ea.add_argument("--say", help="with --resume: advice added to its system prompt")
    d = sub.add_parser("demo", help="run a small research team against fakellm and exit")
    mesh_flags(d)
    d.add_argument("--data-dir", default=".beamline/demo")
    return p


def main(argv: list[str] | None = None) -> None:
    # a command reports its own outcome; reconnect chatter from the client would only bury it
    logging.basicConfig(level=logging.ERROR)
    args = _parser().parse_args(argv)
    sub = (
        getattr(args, "db_command", None)
        or getattr(args, "budget_command", None)
        or getattr(args, "escalation_command", None)
    )
    name = " ".join(filter(None, (args.command, sub)))
    handlers: dict[str, Any] = {
        "up": cmd_up,
        "submit": cmd_submit,
        "trace": cmd_trace,
        "logs": cmd_logs,
        "db": cmd_db_migrate,
        "init": cmd_init,
        "check": cmd_check,
        "budget": cmd_budget,
        "escalation": cmd_escalation,
        "demo": cmd_demo,
        **{
            command: cmd_ops
            for command in (
                "ps",
                "tree",
                "inspect",
                "kill",
                "restart",
                "start-child",
                "terminate-child",
            )
        },
    }
    try:
        result = handlers[args.command](args)
        code = asyncio.run(result) if asyncio.iscoroutine(result) else result
    except BeamlineError as exc:
        print(f"beamline {name}: {exc} [{exc.reason.value}]", file=sys.stderr)
        code = 2
    except (RuntimeError, TimeoutError) as exc:
        print(f"beamline {name}: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    sys.exit(code)
