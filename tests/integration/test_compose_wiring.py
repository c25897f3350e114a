"""docker-compose.yml wired up without Docker: each Beamline container's `command` and
`healthcheck` run as host processes with the container's environment.

No Docker engine runs here, and no ClickHouse server can, so the containers' surroundings
are stood in for:
- nats: a local nats-server running infra/nats/nats-server.conf with the auth.conf beside
  it and the passwords the nats container gets (their defaults). Its store goes to a tmp
  dir, and it listens on 127.0.0.1 with free ports (command-line flags, which override the
  file);
- clickhouse: the embedded engine. Every BEAMLINE_CLICKHOUSE_URL of the file
  (http://<user>:<password>@clickhouse:8123/default) becomes one chdb:// DSN in a tmp dir:
  the same schema and SQL, but no users. So this shows that the init job and the recorder
  get a ClickHouse URL and use it, not the server's grants (tests/unit/test_clickhouse_users.py
  checks those in the engine);
- names: nats and fakellm become 127.0.0.1 with their free ports, 0.0.0.0 becomes
  127.0.0.1, /app (the image's WORKDIR) is this repository and /home/beamline a tmp dir.
Each process gets the image's ENV, then compose's `environment` interpolated against an
empty host: the defaults, as `docker compose up` runs with nothing exported.

As compose orders them: `init` runs first and must exit 0, then the long-running services
start. Once each answers its health request, every compose healthcheck runs as written, two
supervisors share one lease, and a task published as the `client` user is answered into
the client's inbox and recorded. The cluster override is run the same way: three local
nodes from infra/nats/nats-cluster.conf, and init declaring R3 streams across them.

Where a Docker engine answers, the last test runs `docker compose up --wait` for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from nats.aio.client import Client as NATS
from pydantic import SecretStr

from beamline import bus, nats_auth, query, reads, streams, subjects
from beamline.nats_credentials import Credentials
from beamline.process import Process, start_process
from beamline.testing import NatsServer, free_port, wait_for
from tests.unit.test_compose import (
    CLUSTER_CONF,
    INIT_COMMAND,
    NATS_CONF,
    ROOT,
    beamline_services,
    container_env,
    dockerfile_facts,
    environment,
    interpolate,
    load_cluster,
    load_compose,
    nats_nodes,
)

COMPOSE = load_compose()
SERVICES = beamline_services(COMPOSE)
INIT = next(n for n, s in SERVICES.items() if s.get("command") == INIT_COMMAND)
LONG_RUNNING = [n for n in SERVICES if n != INIT]
WORKDIR, _ = dockerfile_facts()
HOME = "/home/beamline"  # the image user's home: BEAMLINE_DATA_DIR lies under it
READY_S = 60.0  # for every service to answer, on a loaded 2-core machine


def _health_name(service: dict[str, Any]) -> str:
    """`python -m services.X` -> X, the name it answers health requests under."""
    return str(service["command"][-1]).removeprefix("services.")


def _nats_env(node: dict[str, Any]) -> dict[str, str]:
    return {k: interpolate(v, {}) for k, v in environment(node).items() if v is not None}


def _password(user: str) -> SecretStr:
    return SecretStr(_nats_env(COMPOSE["services"]["nats"])[nats_auth.password_env(user)])


@dataclass
class Host:
    """This machine standing in for the compose network."""

    root: Path
    ports: dict[tuple[str, int], int] = field(default_factory=dict)  # (host, port) -> free

    @property
    def chdb(self) -> str:
        return f"chdb://{self.root / 'clickhouse'}"

    def port(self, host: str, port: int) -> int:
        return self.ports.setdefault((host, port), free_port())

    def value(self, value: str) -> str:
        for (host, port), local in self.ports.items():
            value = value.replace(f"{host}:{port}", f"127.0.0.1:{local}")
        value = value.replace("0.0.0.0", "127.0.0.1")
        if value == WORKDIR or value.startswith(WORKDIR + "/"):
            value = str(ROOT / value[len(WORKDIR) :].lstrip("/"))
        if value.startswith(HOME):
            value = str(self.root / "home" / value[len(HOME) :].lstrip("/"))
        return value

    def env(self, service: dict[str, Any]) -> dict[str, str]:
        env = {k: self.value(v) for k, v in container_env(service).items()}
        if "BEAMLINE_CLICKHOUSE_URL" in env:
            env["BEAMLINE_CLICKHOUSE_URL"] = self.chdb
        if service.get("command", [])[-1:] == ["services.fakellm"]:
            # the container listens on fakellm's default port; here that port is a free one
            fakellm = urlsplit(container_env(service)["BEAMLINE_FAKELLM_URL"])
            env["BEAMLINE_FAKELLM_PORT"] = str(self.port("fakellm", fakellm.port or 80))
        return env

    def argv(self, command: list[str]) -> list[str]:
        programs = {
            "python": sys.executable,
            "beamline": str(Path(sys.executable).parent / "beamline"),
        }
        return [programs.get(command[0], command[0]), *(self.value(a) for a in command[1:])]

    def start(self, name: str, service: dict[str, Any]) -> Process:
        return start_process(
            name, self.argv(service["command"]), self.env(service), self.root / "logs", cwd=ROOT
        )

    def healthcheck(self, service: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", test  # exec form: no shell in the image to rely on
        return subprocess.run(
            self.argv(test[1:]),
            env={**os.environ, **self.env(service)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


def _with_compose_ports(host: Host) -> None:
    """Free ports for every host:port the services' URLs name (nats:4222, fakellm:8399)."""
    for service in SERVICES.values():
        env = container_env(service)
        for var in ("BEAMLINE_NATS_URL", "BEAMLINE_FAKELLM_URL"):
            for url in filter(None, env.get(var, "").split(",")):
                parts = urlsplit(url.strip())
                if parts.hostname and parts.port:
                    host.port(parts.hostname, parts.port)
    # fakellm's own healthcheck asks it on the container's loopback, at the same port
    fakellm = urlsplit(container_env(SERVICES["fakellm"])["BEAMLINE_FAKELLM_URL"])
    host.ports[("127.0.0.1", fakellm.port or 80)] = host.ports[("fakellm", fakellm.port or 80)]


def start_nats(
    host: Host, name: str, config: Path, env: dict[str, str], extra_args: tuple[str, ...] = ()
) -> NatsServer:
    """A compose nats node as a local nats-server: its config with auth.conf beside it, its
    environment, its client port (and cluster port) free ports on 127.0.0.1."""
    conf_dir = host.root / name
    conf_dir.mkdir(parents=True)
    # the store is the -sd flag's tmp dir (nats-server refuses a second store_dir)
    text = re.sub(r"^\s*store_dir:.*$", "", config.read_text(), flags=re.MULTILINE)
    (conf_dir / "nats.conf").write_text(text)
    shutil.copy(NATS_CONF.parent / "auth.conf", conf_dir / "auth.conf")
    server = NatsServer(
        port=host.port(name, 4222),
        store=host.root / name / "store",
        log_dir=host.root / "logs",
        extra_args=["-c", str(conf_dir / "nats.conf"), "-m", str(free_port()), *extra_args],
    )
    with pytest.MonkeyPatch.context() as mp:  # nats-server reads its variables at start
        for key, value in env.items():
            mp.setenv(key, host.value(value))
        server.start()
    return server


@dataclass
class Stack:
    host: Host
    nats: NatsServer
    init: Process
    processes: dict[str, Process]

    @property
    def url(self) -> str:
        return self.nats.url

    async def connect(self, user: str) -> NATS:
        credentials = Credentials(user=user, password=_password(user))
        return await bus.connect(self.url, f"wiring-{user}", credentials, give_up_s=10)

    def logs(self) -> str:
        out = [f"--- {INIT} ---\n{self.init.logs()[-3000:]}"]
        out += [f"--- {n} ---\n{p.logs()[-3000:]}" for n, p in self.processes.items()]
        return "\n".join(out)


async def _ready(stack: Stack) -> None:
    """Every service answers: NATS services their health request (asked as admin, who may
    ask anyone), fakellm its HTTP /healthz."""
    nc = await stack.connect("admin")
    deadline = time.monotonic() + READY_S
    try:
        for name in LONG_RUNNING:
            proc, service = stack.processes[name], SERVICES[name]

            async def answered(
                name: str = name, proc: Process = proc, service: dict[str, Any] = service
            ) -> bool:
                if not proc.alive():
                    raise AssertionError(f"{name} exited with {proc.popen.returncode}")
                if name == "fakellm":
                    url = stack.host.env(service)["BEAMLINE_FAKELLM_URL"] + "/healthz"
                    async with httpx.AsyncClient() as client:
                        return (await client.get(url, timeout=1)).status_code == 200
                msg = await nc.request(subjects.health(_health_name(service)), b"", timeout=1)
                return bool(json.loads(msg.data).get("ok"))

            left = max(1.0, deadline - time.monotonic())
            await wait_for(answered, timeout=left, interval=0.1, what=f"{name} to answer")
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    host = Host(tmp_path_factory.mktemp("compose"))
    _with_compose_ports(host)
    nats = start_nats(host, "nats", NATS_CONF, _nats_env(COMPOSE["services"]["nats"]))
    procs: dict[str, Process] = {}
    init = host.start(INIT, SERVICES[INIT])
    try:
        try:
            init.popen.wait(90)
        except subprocess.TimeoutExpired:
            init.kill()
        built = Stack(host, nats, init, procs)
        if init.popen.returncode != 0:
            pytest.fail(f"init exited with {init.popen.returncode}:\n{init.logs()}")
        for name in LONG_RUNNING:
            procs[name] = host.start(name, SERVICES[name])
        try:
            asyncio.run(_ready(built))
        except Exception as exc:
            pytest.fail(f"the services did not all come up: {exc}\n{built.logs()}")
        yield built
    finally:
        for proc in reversed(procs.values()):
            proc.kill()
        init.kill()
        nats.kill()
        print("\n".join(f"--- {n} log (tail) ---\n{p.logs()[-2000:]}" for n, p in procs.items()))


def test_init_declares_the_layout_and_applies_the_schema_then_exits_0(stack: Stack) -> None:
    assert stack.init.popen.returncode == 0
    out = stack.init.logs()
    for name in subjects.RECORDED_STREAMS:
        assert f"stream {name} R1" in out, out
    assert "bucket BL_SUPERVISOR R1" in out, out
    assert "applied 1 001_messages.sql" in out, out
    assert stack.host.chdb in out  # the writer's URL, as the chdb stand-in


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_each_compose_healthcheck_passes_as_written(stack: Stack, name: str) -> None:
    done = stack.host.healthcheck(SERVICES[name])
    assert done.returncode == 0, done.stdout + done.stderr


async def test_two_supervisors_share_the_lease_one_leads(stack: Stack) -> None:
    supervisors = {
        container_env(s)["BEAMLINE_SUPERVISOR_INSTANCE_ID"]
        for s in SERVICES.values()
        if _health_name(s) == "supervisor"
    }
    assert len(supervisors) == 2
    nc = await stack.connect("admin")
    seen: dict[str, str] = {}
    try:

        async def both() -> bool:  # one subject, a queue group: the server picks who answers
            answer = json.loads((await nc.request(subjects.health("supervisor"), b"", 1)).data)
            seen[answer["instance"]] = answer["role"]
            return set(seen) == supervisors and "leader" in seen.values()

        await wait_for(both, timeout=15, interval=0.05, what=f"both supervisors: {seen}")
    finally:
        await nc.close()
    assert sorted(seen.values()) == ["leader", "standby"]


async def test_a_client_task_gets_its_reply_and_is_recorded(stack: Stack) -> None:
    client = await stack.connect("client")
    conversation = f"wiring-{uuid.uuid4().hex[:8]}"
    inbox = f"{nats_auth.inbox_prefix('client')}.{conversation}"
    try:
        replies = await client.subscribe(inbox)  # listen first, then ask
        task = {"prompt": "What does a supervisor do?", "conversation_id": conversation}
        await client.publish(
            subjects.task("research"), json.dumps({**task, "reply_to": inbox}).encode()
        )
        reply = json.loads((await replies.next_msg(timeout=45)).data)
    finally:
        await client.close()
    assert reply["kind"] == "reply", reply
    assert "restart intensity" in reply["payload"]["text"]  # fakellm-demo.yaml's researcher

    admin = await stack.connect("admin")
    try:

        async def recorded() -> list[dict[str, Any]]:
            rows = (await query.query(admin, reads.TRACE_SQL, {"id": conversation})).dicts()
            return rows if any(r["kind"] == "reply" for r in rows) else []

        rows = await wait_for(recorded, timeout=20, interval=0.2, what="the recorder to store it")
    finally:
        await admin.close()
    assert {"task", "llm_response", "tool_result", "reply"} <= {r["kind"] for r in rows}


# --- the cluster override: three nodes, R3 streams -----------------------------------------


async def test_the_cluster_profile_runs_init_with_three_replicas(tmp_path: Path) -> None:
    cluster = load_cluster()
    nodes = nats_nodes(cluster)
    init = beamline_services(cluster)[INIT]
    host = Host(tmp_path)
    for name in nodes:
        host.port(name, 4222)
        host.port(name, 6222)  # the route port each node's NATS_ROUTE_<n> names
    servers: list[NatsServer] = []
    try:
        for name, node in nodes.items():
            cluster_port = host.port(name, 6222)
            route = ("--cluster", f"nats://127.0.0.1:{cluster_port}")
            servers.append(start_nats(host, name, CLUSTER_CONF, _nats_env(node), route))
        done = subprocess.run(  # noqa: ASYNC221 - the test waits for the job on purpose
            host.argv(init["command"]),
            env={**os.environ, **host.env(init)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        for name in (*subjects.RECORDED_STREAMS, subjects.BUCKET_SUPERVISOR):
            assert re.search(rf"(stream|bucket) {name} R3$", done.stdout, re.MULTILINE), done.stdout

        # a service only checks the layout at start, and sees it replicated; declaring it
        # again without a replica count (as `beamline up` does) keeps the replicas
        agent = beamline_services(cluster)["agent-host"]
        url = host.env(agent)["BEAMLINE_NATS_URL"]
        for user in ("agent", "init"):
            credentials = Credentials(user=user, password=_password(user))
            nc = await bus.connect(url, f"wiring-{user}", credentials, give_up_s=10)
            try:
                js = nc.jetstream()
                if user == "agent":
                    await streams.require_layout(js, nats_auth.USES[nats_auth.Role.AGENT], 10)
                else:
                    await streams.ensure_streams(js, 32)
                for stream in (
                    subjects.STREAM_TASKS,
                    nats_auth.kv_stream(subjects.BUCKET_ATTEMPTS),
                ):
                    info = await js.stream_info(stream)
                    assert info.config.num_replicas == 3, (user, stream)
                    assert info.cluster is not None and len(info.cluster.replicas or []) == 2
            finally:
                await nc.close()
    finally:
        for server in servers:
            server.kill()


# --- the real thing, where a Docker engine answers ------------------------------------------


def _docker_engine() -> str | None:
    """None when `docker info` succeeds, else why not."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    try:
        probe = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker info` failed: {exc}"
    if probe.returncode != 0:
        return f"no Docker engine: `docker info` exited {probe.returncode}"
    return None


@pytest.mark.timeout(1200)
@pytest.mark.skipif(_docker_engine() is not None, reason=str(_docker_engine()))
def test_docker_compose_up_waits_for_every_healthcheck() -> None:
    project = f"beamline-wiring-{uuid.uuid4().hex[:6]}"
    compose = ["docker", "compose", "-p", project, "-f", str(ROOT / "docker-compose.yml")]
    try:
        up = subprocess.run(
            [*compose, "up", "-d", "--build", "--wait", "--wait-timeout", "600"],
            capture_output=True,
            text=True,
            timeout=1100,
            check=False,
        )
        assert up.returncode == 0, up.stdout + up.stderr
    finally:
        with contextlib.suppress(Exception):
            subprocess.run([*compose, "down", "-v"], capture_output=True, timeout=120, check=False)
