"""docker-compose.yml checked without a Docker engine.

No Docker engine runs here, so these tests check the file without one:
- it validates against the Compose specification's JSON schema (infra/compose/);
- every Beamline container runs `python -m services.<name>`, and that module exists;
- every `BEAMLINE_*` variable it sets is one the code reads. The known names come from
  the pydantic-settings classes and the deployment YAML, not from a hand-written list;
- the NATS and ClickHouse URLs point at compose services;
- the deployment YAML named by `BEAMLINE_CONFIG` loads with the container's environment,
  and its providers reach compose hostnames;
- volumes are declared, ports are bound to 127.0.0.1, and secrets come from the host;
- healthchecks and `depends_on` conditions agree;
- least privilege: each service connects to NATS as its role's user with the same password
  variable the nats container gives nats-server, and to ClickHouse as `writer` (the
  recorder and the init job) or `readonly` (the rest, Grafana too), users the clickhouse
  container gets from infra/clickhouse/users.xml with every password variable set;
- the init job runs once (`beamline init`) and every service on NATS waits for it; each
  long-running Beamline service has a healthcheck that asks it over NATS
  (`python -m beamline.health <service>`);
- Grafana: a pinned image and plugin, the provisioning and dashboards mounted where the
  provisioning files say, and every `$VAR` those files read set on the grafana service;
- the 3-node cluster override (docker-compose.cluster.yml) validates alone and merged with
  the base file (Compose's merge rules), and the merged view passes every check above plus
  the cluster's own: routes between all nodes with their own password, every URL on every
  service, R3 streams from init; nats-server accepts the cluster config of each node.

Each checker returns a list of problems, and each one is also shown to reject a broken
copy of the file.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from pydantic_settings import BaseSettings

from beamline import cli, config, grafana, nats_auth
from beamline.errors import ConfigError
from beamline.process import nats_server_binary
from beamline.storage import SCHEMA_DIR_ENV

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "infra/compose/compose-spec.json"
DOCKERFILE = ROOT / "infra/docker/Dockerfile"
NATS_CONF = ROOT / "infra/nats/nats-server.conf"
CLICKHOUSE_USERS = ROOT / "infra/clickhouse/users.xml"
CLUSTER = ROOT / "docker-compose.cluster.yml"
CLUSTER_CONF = ROOT / "infra/nats/nats-cluster.conf"
GRAFANA_PROVISIONING = ROOT / "infra/grafana/provisioning"

Compose = dict[str, Any]
Env = dict[str, str | None]


# --- reading the files -------------------------------------------------------------------


def load_compose(path: Path = COMPOSE) -> Compose:
    data = yaml.safe_load(path.read_text())  # SafeLoader resolves `<<` merge keys
    assert isinstance(data, dict)
    return data


def schema_problems(path: Path) -> list[str]:
    return data_schema_problems(yaml.safe_load(path.read_text()))


def data_schema_problems(data: Any) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    # The schema declares draft-07 as "https://json-schema.org/draft-07/schema", a spelling
    # jsonschema.validators.validator_for does not map, so pick the validator here.
    assert "draft-07" in schema["$schema"], schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    errors = jsonschema.Draft7Validator(schema).iter_errors(data)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# Compose's merge rules for `-f base -f override` (the Compose specification's merge.md),
# for the keys these files use: most sequences are replaced, these are unions...
_UNION_LISTS = {"ports", "expose", "dns", "dns_search", "tmpfs", "external_links"}
# ...and these merge by the mount target
_BY_TARGET = {"volumes", "devices"}


def _target(mount: Any) -> str:
    if isinstance(mount, dict):
        return str(mount.get("target"))
    parts = str(mount).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def merge_compose(base: Any, override: Any, key: str = "") -> Any:
    """The merged view `docker compose -f base -f override config` shows."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for k, v in override.items():
            merged[k] = merge_compose(base[k], v, k) if k in base else v
        return merged
    if isinstance(base, list) and isinstance(override, list):
        if key in _UNION_LISTS:
            return [*base, *(item for item in override if item not in base)]
        if key in _BY_TARGET:
            replaced = {_target(m) for m in override}
            return [*(m for m in base if _target(m) not in replaced), *override]
    return copy.deepcopy(override)


def load_cluster() -> Compose:
    merged = merge_compose(load_compose(), load_compose(CLUSTER))
    assert isinstance(merged, dict)
    return merged


def dockerfile_facts(path: Path = DOCKERFILE) -> tuple[str, Env]:
    """The image's WORKDIR and its ENV, from the Dockerfile."""
    text = re.sub(r"\\\n", " ", path.read_text())
    workdir, env = "/", Env()
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if len(words) != 2:
            continue
        if words[0].upper() == "WORKDIR":
            workdir = words[1].strip()
        elif words[0].upper() == "ENV":
            parts = shlex.split(words[1])
            if "=" in parts[0]:
                for part in parts:
                    key, _, value = part.partition("=")
                    env[key] = value
            else:  # legacy `ENV KEY value`
                env[parts[0]] = " ".join(parts[1:])
    return workdir, env


_COMPOSE_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, host: Env) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}` and `$$`."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        value = host.get(name)
        if op in (":-", ":?") and not value:
            value = None
        if value is not None:
            return value
        if op in (":?", "?"):
            raise ValueError(f"${{{name}}} must be set on the host: {arg}")
        return arg if op in (":-", "-") else ""

    return _COMPOSE_VAR.sub(sub, value)


def environment(service: dict[str, Any]) -> Env:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in raw)
        return {k: v for k, v in pairs}
    return {k: None if v is None else str(v) for k, v in raw.items()}


def is_beamline(service: dict[str, Any]) -> bool:
    """A service built from this repository (infra/docker/Dockerfile)."""
    return "build" in service


def beamline_services(compose: Compose) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if is_beamline(s)}


def container_env(service: dict[str, Any], host: Env | None = None) -> dict[str, str]:
    """What the process sees: the image ENV, overridden by compose's environment
    interpolated against `host` (by default an empty host: the file must work as is)."""
    _, env = dockerfile_facts()
    merged = {k: v for k, v in env.items() if v is not None}
    for key, value in environment(service).items():
        if value is None:  # passed through from the host by name
            if host and host.get(key) is not None:
                merged[key] = str(host[key])
            continue
        merged[key] = interpolate(value, host or {})
    return merged


def known_beamline_variables() -> set[str]:
    """Every BEAMLINE_* name some code reads: the pydantic-settings classes' fields with
    their env_prefix, plus the schema-directory override `beamline.storage` reads."""
    for path in [*ROOT.glob("shared/beamline/**/*.py"), *ROOT.glob("services/**/*.py")]:
        if "BaseSettings" in path.read_text():
            parts = path.relative_to(ROOT).with_suffix("").parts
            importlib.import_module(".".join(parts[1:] if parts[0] == "shared" else parts))
    names = {SCHEMA_DIR_ENV}
    todo = list(BaseSettings.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not cls.__module__.startswith(("beamline", "services")):
            continue
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            names.add((prefix + (field.alias or name)).upper())
    return names


_YAML_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def deployment_variables(text: str) -> dict[str, bool]:
    """`${VAR}` names in a deployment YAML -> whether each has a default."""
    found: dict[str, bool] = {}
    for name, default in _YAML_VAR.findall(text):
        found[name] = found.get(name, True) and bool(default)
    return found


def deployment_file(service: dict[str, Any], root: Path) -> Path:
    workdir, _ = dockerfile_facts()
    inside = Path(container_env(service).get("BEAMLINE_CONFIG", ""))
    if not inside.is_absolute():
        inside = Path(workdir) / inside
    return root / inside.relative_to(workdir)  # the Dockerfile copies infra/ into WORKDIR


# --- the checkers ------------------------------------------------------------------------


def _cli_problem(command: list[str]) -> str | None:
    """Why `beamline <args>` would not run: the CLI parser's own complaint, or None."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cli._parser().parse_args(command[1:])
    except SystemExit as exc:
        return err.getvalue().strip().splitlines()[-1] if exc.code else None
    return None


def command_problems(compose: Compose) -> list[str]:
    problems = []
    for name, service in beamline_services(compose).items():
        command = service.get("command")
        if isinstance(command, list) and command[:1] == ["beamline"]:  # the console script
            problem = _cli_problem(command)
            if problem:
                problems.append(f"{name}: {command!r}: {problem}")
            elif command != INIT_COMMAND:
                problems.append(f"{name}: {command!r} is not a container's job, only init is")
            continue
        if not (isinstance(command, list) and command[:2] == ["python", "-m"]):
            problems.append(f"{name}: command {command!r} is not ['python', '-m', 'services.X']")
            continue
        module = command[2]
        try:
            found = module.startswith("services.") and importlib.util.find_spec(
                module + ".__main__"
            )
        except ModuleNotFoundError:
            found = None
        if not found:
            problems.append(f"{name}: module {module!r} has no __main__ in this repository")
    return problems


def variable_problems(compose: Compose, root: Path = ROOT) -> list[str]:
    problems = []
    known = known_beamline_variables()
    _, image_env = dockerfile_facts()
    for name, service in beamline_services(compose).items():
        path = deployment_file(service, root)
        read_by_yaml = set(deployment_variables(path.read_text())) if path.exists() else set()
        for var in [*environment(service), *image_env]:
            if var.startswith("BEAMLINE_") and var not in known | read_by_yaml:
                problems.append(f"{name}: {var} is read by no settings class nor by {path.name}")
        env = container_env(service)
        services = set(compose["services"])
        for server in env.get("BEAMLINE_NATS_URL", "").split(","):
            nats = urlsplit(server.strip())
            if nats.scheme != "nats" or nats.hostname not in services:
                problems.append(f"{name}: BEAMLINE_NATS_URL must be nats://<a compose service>")
        clickhouse = urlsplit(env.get("BEAMLINE_CLICKHOUSE_URL", ""))
        if clickhouse.scheme not in ("http", "https") or clickhouse.hostname not in services:
            problems.append(f"{name}: BEAMLINE_CLICKHOUSE_URL must be http://<a compose service>")
    return problems


def deployment_problems(compose: Compose, root: Path = ROOT) -> list[str]:
    """The deployment YAML each Beamline container loads, with that container's environment."""
    problems = []
    services = set(compose["services"])
    gateways = [
        environment(s)
        for s in beamline_services(compose).values()
        if "services.gateway" in s["command"]
    ]
    for name, service in beamline_services(compose).items():
        path = deployment_file(service, root)
        if not path.exists():
            problems.append(f"{name}: BEAMLINE_CONFIG names {path}, which the image lacks")
            continue
        env = container_env(service)
        for var, has_default in deployment_variables(path.read_text()).items():
            if not has_default and var not in env:
                problems.append(f"{name}: {path.name} needs {var}, which is not set")
        with mock.patch.dict(os.environ, env, clear=True):
            try:
                deployment = config.load(path)
            except ConfigError as exc:
                problems.append(f"{name}: {exc}")
                continue
        for provider_name, provider in deployment.providers.items():
            url = urlsplit(provider.base_url)
            if url.scheme == "http" and url.hostname not in services:
                problems.append(
                    f"{name}: provider {provider_name} base_url {provider.base_url} is not a "
                    "compose service (plain http to anything else fails in a container)"
                )
            key = provider.api_key_env
            if key and not all(key in gateway for gateway in gateways):
                problems.append(
                    f"{name}: provider {provider_name}'s {key} is not passed to the gateway"
                )
    return problems


def _volume_sources(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(type, source) of each volume: "volume" for named volumes, "bind" for paths."""
    for item in service.get("volumes", []):
        if isinstance(item, dict):
            yield item.get("type", "volume"), str(item.get("source", ""))
            continue
        source = item.split(":", 1)[0]
        yield ("bind" if source.startswith((".", "/", "~")) else "volume"), source


def volume_problems(compose: Compose, root: Path = ROOT) -> list[str]:
    problems = []
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for kind, source in _volume_sources(service):
            if kind == "volume" and source not in declared:
                problems.append(f"{name}: named volume {source!r} is not declared under volumes")
            if kind == "bind" and source.startswith(".") and not (root / source).exists():
                problems.append(f"{name}: bind mount {source!r} does not exist in the repository")
    return problems


def port_problems(compose: Compose) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port)
            if not str(host_ip).startswith("127.0.0.1"):
                problems.append(f"{name}: port {port!r} is not bound to 127.0.0.1")
    return problems


_PASS_THROUGH = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(:?-)?\}")
_WHOLE_INTERPOLATION = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}")
_KEY_NAME = re.compile(r"(API_?KEY|_KEY|TOKEN|SECRET)$", re.IGNORECASE)
_KEY_SHAPES = re.compile(
    r"sk-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}|xox[abpr]-[A-Za-z0-9-]{10,}"
    r"|(?<![A-Za-z0-9_/.-])(?=[A-Za-z0-9+/_-]*[0-9])(?=[A-Za-z0-9+/_-]*[A-Za-z])[A-Za-z0-9+/_-]{32,}"
)


def secret_problems(compose: Compose, text: str) -> list[str]:
    """Keys come from the host by name; passwords only through `${VAR...}`; no key-shaped
    literal anywhere in the file."""
    problems = []
    for name, service in compose["services"].items():
        for var, value in environment(service).items():
            if _KEY_NAME.search(var):
                match = _PASS_THROUGH.fullmatch(value or "")
                if value is not None and not (match and match["name"] == var):
                    problems.append(f"{name}: {var} must be passed from the host, not written")
            if "PASSWORD" in var.upper() and not _WHOLE_INTERPOLATION.fullmatch(value or ""):
                problems.append(f"{name}: {var} must come from ${{...}}, not a literal")
            password = urlsplit(value).password if value and "://" in value else None
            if password and not _WHOLE_INTERPOLATION.fullmatch(password):
                problems.append(f"{name}: {var} carries a literal password")
    problems.extend(f"key-shaped literal: {m[:8]}..." for m in _KEY_SHAPES.findall(text))
    return problems


def health_problems(compose: Compose) -> list[str]:
    problems = []
    services = compose["services"]
    for name, service in services.items():
        if not is_beamline(service) and "healthcheck" not in service:
            problems.append(f"{name}: an infrastructure image without a healthcheck")
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for dep, spec in depends.items():
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep!r}")
                continue
            healthy = spec.get("condition") == "service_healthy"
            has_check = "healthcheck" in services[dep] and not services[dep]["healthcheck"].get(
                "disable"
            )
            if healthy and not has_check:
                problems.append(f"{name}: waits for {dep} to be healthy, which has no healthcheck")
            if has_check and not healthy:
                problems.append(f"{name}: {dep} has a healthcheck; wait for service_healthy")
    return problems


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of each bind mount."""
    out = {}
    for item in service.get("volumes", []):
        source, _, rest = str(item).partition(":")
        if source.startswith((".", "/")):
            out[rest.split(":")[0]] = source
    return out


INIT_COMMAND = ["beamline", "init"]


def _module_of(service: dict[str, Any]) -> str:
    """`services.X` -> X: the service a container runs (also its health name)."""
    command = service.get("command") or []
    return str(command[-1]).removeprefix("services.") if command[:2] == ["python", "-m"] else ""


def _role_of(service: dict[str, Any]) -> nats_auth.Role | None:
    if service.get("command") == INIT_COMMAND:
        return nats_auth.Role.INIT
    return nats_auth.SERVICE_ROLES.get(_module_of(service))


def nats_nodes(compose: Compose) -> dict[str, dict[str, Any]]:
    """The nats-server containers: one, or the nodes of a cluster."""
    return {
        n: s for n, s in compose["services"].items() if str(s.get("image", "")).startswith("nats:")
    }


def _config_of(node: dict[str, Any]) -> str:
    command = node.get("command") or []
    return str(command[command.index("-c") + 1]) if "-c" in command else ""


def nats_user_problems(compose: Compose) -> list[str]:
    """Each service connects as its role's user, with the password variable that the nats
    container hands nats-server for that user; every node has every user of auth.conf,
    mounted beside the config it runs."""
    problems = []
    nats = compose["services"]["nats"]
    server_env = environment(nats)
    for node_name, node in nats_nodes(compose).items():
        node_env = environment(node)
        for user in nats_auth.default_users():
            var = user.password_env
            if not node_env.get(var):
                problems.append(f"{node_name}: {var} is not set, nats-server will not start")
            elif node_env[var] != server_env.get(var):
                problems.append(f"{node_name}: {var} differs from the one nats gets")
        beside = str(Path(_config_of(node)).parent / "auth.conf")
        if _mounts(node).get(beside) != "./infra/nats/auth.conf":
            problems.append(f"{node_name}: infra/nats/auth.conf is not mounted beside the config")
    for name, service in beamline_services(compose).items():
        role = _role_of(service)
        if role is None:
            continue
        env = environment(service)
        if env.get("BEAMLINE_NATS_USER") != role.value:
            problems.append(f"{name}: BEAMLINE_NATS_USER must be {role.value!r}")
        if env.get("BEAMLINE_NATS_PASSWORD") != server_env.get(nats_auth.password_env(role.value)):
            problems.append(
                f"{name}: BEAMLINE_NATS_PASSWORD must be the nats container's "
                f"{nats_auth.password_env(role.value)}"
            )
    return problems


def clickhouse_user_problems(compose: Compose) -> list[str]:
    """The recorder writes as `writer`, the rest read as `readonly`; the clickhouse
    container mounts the users and sets every password they read from the environment."""
    problems = []
    clickhouse = compose["services"]["clickhouse"]
    server_env = environment(clickhouse)
    if _mounts(clickhouse).get("/etc/clickhouse-server/users.d/beamline.xml") != (
        "./infra/clickhouse/users.xml"
    ):
        problems.append("clickhouse: infra/clickhouse/users.xml is not mounted into users.d")
    wanted = {e.get("from_env") for e in ET.parse(CLICKHOUSE_USERS).iter() if e.get("from_env")}
    for var in sorted(v for v in wanted if v and not server_env.get(v)):
        problems.append(f"clickhouse: {var} is not set, so that user has no password")
    for name, service in beamline_services(compose).items():
        url = urlsplit(environment(service).get("BEAMLINE_CLICKHOUSE_URL") or "")
        writes = "services.recorder" in service["command"] or service["command"] == INIT_COMMAND
        want = "writer" if writes else "readonly"
        if url.username != want:
            problems.append(f"{name}: connects to ClickHouse as {url.username!r}, not {want!r}")
            continue
        var = f"CLICKHOUSE_{want.upper()}_PASSWORD"
        if url.password != server_env.get(var):
            problems.append(f"{name}: the ClickHouse password must be the container's {var}")
    return problems


def _depends_on(service: dict[str, Any]) -> dict[str, Any]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return {d: {"condition": "service_started"} for d in depends}
    return dict(depends)


def lifecycle_problems(compose: Compose) -> list[str]:
    """One init job (`beamline init`, run once), awaited by every service on NATS, and
    adopted by a long-running one (which `docker compose up --wait` needs); every other
    Beamline service has a healthcheck: `python -m beamline.health <its service>`."""
    problems = []
    services = beamline_services(compose)
    inits = [n for n, s in services.items() if s.get("command") == INIT_COMMAND]
    if len(inits) != 1:
        return [f"want one init job running {INIT_COMMAND}, found {inits}"]
    (init,) = inits
    if services[init].get("restart") != "no":
        problems.append(f'{init}: a one-shot job needs restart: "no"')
    if "healthcheck" in services[init]:
        problems.append(f"{init}: a one-shot job has no healthcheck")
    if importlib.util.find_spec("beamline.health") is None:
        problems.append("beamline.health does not exist: no healthcheck can run")
    for name, service in services.items():
        if name == init:
            continue
        module = _module_of(service)
        waits = _depends_on(service).get(init, {}).get("condition")
        if _role_of(service) and waits != "service_completed_successfully":
            problems.append(f"{name}: connects to NATS but does not wait for {init} to complete")
        test = (service.get("healthcheck") or {}).get("test")
        if module in nats_auth.SERVICE_ROLES:
            want = ["CMD", "python", "-m", "beamline.health", module]
            if test != want:
                problems.append(f"{name}: healthcheck {test!r} is not {want!r}")
        elif not test:
            problems.append(f"{name}: a long-running service without a healthcheck")
    return problems


_GRAFANA_VAR = re.compile(r"\$\$|\$\{(\w+)\}|\$(\w+)")


def grafana_variables(root: Path = GRAFANA_PROVISIONING) -> dict[str, str]:
    """`$VAR` and `${VAR}` in the values of Grafana's provisioning files (Grafana expands
    them from its environment; keys and comments are not expanded; `$$` is a literal $) ->
    the file that reads each."""
    found: dict[str, str] = {}

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value, where)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)
        elif isinstance(node, str):
            for match in _GRAFANA_VAR.finditer(node):
                name = match.group(1) or match.group(2)
                if name:
                    found.setdefault(name, where)

    for path in sorted(root.rglob("*.y*ml")):
        walk(yaml.safe_load(path.read_text()), str(path.relative_to(root)))
    return found


def _grafana_expand(value: Any, env: dict[str, str]) -> str:
    """A provisioning value as Grafana reads it with `env`."""
    return _GRAFANA_VAR.sub(
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1) or m.group(2), ""),
        str(value),
    )


def _pinned(reference: str, separator: str) -> bool:
    name, _, version = reference.rpartition(separator)
    return bool(name) and bool(re.fullmatch(r"v?\d+(\.\d+)+", version))


def grafana_problems(compose: Compose, root: Path = GRAFANA_PROVISIONING) -> list[str]:
    """A pinned image and plugin; the provisioning and dashboards where the provisioning
    files look; every variable they read set here; ClickHouse read as `readonly`."""
    problems = []
    service = compose["services"].get("grafana")
    if service is None:
        return ["no grafana service"]
    env = {k: interpolate(v, {}) for k, v in environment(service).items() if v is not None}
    if not _pinned(str(service.get("image", "")), ":"):
        problems.append(f"grafana: image {service.get('image')!r} is not pinned to a version")
    plugins = env.get("GF_PLUGINS_PREINSTALL_SYNC", "").split(",")
    plugin = next((p for p in plugins if p.split("@")[0] == grafana.PLUGIN), "")
    if not _pinned(plugin, "@"):
        problems.append(
            f"grafana: GF_PLUGINS_PREINSTALL_SYNC must install {grafana.PLUGIN}@<version> "
            f"before provisioning, not {plugin!r}"
        )
    mounts = _mounts(service)
    if mounts.get("/etc/grafana/provisioning") != "./infra/grafana/provisioning":
        problems.append("grafana: infra/grafana/provisioning is not at /etc/grafana/provisioning")
    for provider in yaml.safe_load((root / "dashboards/beamline.yaml").read_text())["providers"]:
        if mounts.get(provider["options"]["path"]) != "./dashboards":
            problems.append(f"grafana: dashboards/ is not at {provider['options']['path']}")
    for var, where in grafana_variables(root).items():
        if not env.get(var):
            problems.append(f"grafana: provisioning {where} reads ${var}, which is not set")
    (source,) = yaml.safe_load((root / "datasources/clickhouse.yaml").read_text())["datasources"]
    host = _grafana_expand(source["jsonData"]["host"], env)
    if host not in compose["services"]:
        problems.append(f"grafana: the datasource's host {host!r} is not a compose service")
    if _grafana_expand(source["jsonData"]["username"], env) != "readonly":
        problems.append("grafana: the datasource must read ClickHouse as readonly")
    # the same host variable as the clickhouse container gives that user
    password = _GRAFANA_VAR.fullmatch(source["secureJsonData"]["password"])
    readonly = environment(compose["services"]["clickhouse"]).get("CLICKHOUSE_READONLY_PASSWORD")
    var = (password.group(1) or password.group(2)) if password else ""
    if not var or environment(service).get(var) != readonly:
        problems.append("grafana: the datasource password is not the readonly user's")
    test = " ".join(map(str, (service.get("healthcheck") or {}).get("test") or []))
    if "/api/health" not in test:
        problems.append("grafana: the healthcheck does not ask /api/health")
    return problems


def _route_targets(node_env: dict[str, str]) -> dict[str, str]:
    """NATS_ROUTE_<n> -> the host each route URL names."""
    return {
        k: urlsplit(v).hostname or ""
        for k, v in node_env.items()
        if re.fullmatch(r"NATS_ROUTE_\d+", k)
    }


def cluster_problems(compose: Compose) -> list[str]:
    """Three nodes routed to each other with their own password (which no Beamline
    container gets), each with its own name and store; every service knows every node;
    the init job declares R3 once every node is healthy."""
    problems = []
    nodes = nats_nodes(compose)
    if len(nodes) < 3:
        return [f"a cluster wants 3 nats nodes, found {sorted(nodes)}"]
    envs = {
        n: {k: str(v) for k, v in environment(s).items() if v is not None} for n, s in nodes.items()
    }
    names = [e.get("NATS_SERVER_NAME") for e in envs.values()]
    if None in names or len(set(names)) != len(names):
        problems.append(f"nats nodes need distinct NATS_SERVER_NAME values, have {names}")
    for name, node in nodes.items():
        env = envs[name]
        if _mounts(node).get(_config_of(node)) != "./infra/nats/nats-cluster.conf":
            problems.append(f"{name}: does not run infra/nats/nats-cluster.conf")
        if not any(str(v).endswith(":/data") for v in node.get("volumes", [])):
            problems.append(f"{name}: no store of its own at /data")
        password = env.get("NATS_ROUTE_PASSWORD")
        if not password or password != envs["nats"].get("NATS_ROUTE_PASSWORD"):
            problems.append(f"{name}: NATS_ROUTE_PASSWORD must be set, the same on every node")
        targets = _route_targets(env)
        if sorted(targets.values()) != sorted(nodes):
            problems.append(f"{name}: routes {sorted(targets.values())} are not {sorted(nodes)}")
        for var in targets:
            url = urlsplit(env[var])
            if url.scheme != "nats-route" or url.username != "route" or url.password != password:
                problems.append(f"{name}: {var} must be nats-route://route:<NATS_ROUTE_PASSWORD>@…")
    for name, service in beamline_services(compose).items():
        wants = environment(service)
        if any(k.startswith("NATS_ROUTE") for k in wants):
            problems.append(f"{name}: a Beamline service must not get the route password")
        servers = {
            urlsplit(u.strip()).hostname for u in (wants.get("BEAMLINE_NATS_URL") or "").split(",")
        }
        if servers != set(nodes):
            problems.append(
                f"{name}: BEAMLINE_NATS_URL names {sorted(map(str, servers))}, not every node"
            )
        if service.get("command") == INIT_COMMAND:
            if wants.get("BEAMLINE_STREAM_REPLICAS") != str(len(nodes)):
                problems.append(f"{name}: BEAMLINE_STREAM_REPLICAS must be {len(nodes)}")
            healthy = {
                d
                for d, c in _depends_on(service).items()
                if c.get("condition") == "service_healthy"
            }
            if not set(nodes) <= healthy:
                problems.append(f"{name}: an R3 stream needs every node healthy first")
    return problems


# --- the real file -----------------------------------------------------------------------


def test_the_compose_file_validates_against_the_compose_specification() -> None:
    assert schema_problems(COMPOSE) == []


def test_the_schema_is_kept_with_its_licence() -> None:
    assert "Apache License" in (SCHEMA.parent / "compose-spec.LICENSE").read_text()


CHECKS: list[Callable[[Compose], list[str]]] = [
    command_problems,
    variable_problems,
    deployment_problems,
    volume_problems,
    port_problems,
    health_problems,
    nats_user_problems,
    clickhouse_user_problems,
    lifecycle_problems,
    grafana_problems,
]


@pytest.mark.parametrize("check", CHECKS)
def test_the_compose_file_is_consistent(check: Callable[[Compose], list[str]]) -> None:
    assert check(load_compose()) == []


def test_the_cluster_override_validates_alone_and_merged() -> None:
    assert schema_problems(CLUSTER) == []
    assert data_schema_problems(load_cluster()) == []


@pytest.mark.parametrize("check", [*CHECKS, cluster_problems])
def test_the_cluster_profile_is_consistent(check: Callable[[Compose], list[str]]) -> None:
    assert check(load_cluster()) == []


def test_no_secret_is_written_in_the_cluster_override() -> None:
    assert secret_problems(load_cluster(), CLUSTER.read_text()) == []


def test_the_single_server_is_no_cluster() -> None:
    assert cluster_problems(load_compose()) == ["a cluster wants 3 nats nodes, found ['nats']"]


def test_the_merge_follows_compose_rules() -> None:
    base = {
        "services": {
            "a": {
                "command": ["x"],
                "environment": {"A": "1", "B": "2"},
                "volumes": ["v:/data", "./c:/etc/c:ro"],
                "ports": ["1:1"],
            }
        }
    }
    override = {
        "services": {
            "a": {
                "command": ["y"],
                "environment": {"B": "3"},
                "volumes": ["./d:/etc/c:ro"],
                "ports": ["2:2"],
            }
        }
    }
    assert merge_compose(base, override) == {
        "services": {
            "a": {
                "command": ["y"],
                "environment": {"A": "1", "B": "3"},
                "volumes": ["v:/data", "./d:/etc/c:ro"],
                "ports": ["1:1", "2:2"],
            }
        }
    }


def test_every_grafana_provisioning_variable_is_found() -> None:
    assert set(grafana_variables()) == {
        "CLICKHOUSE_HOST",
        "CLICKHOUSE_HTTP_PORT",
        "CLICKHOUSE_DATABASE",
        "CLICKHOUSE_GRAFANA_USER",
        "CLICKHOUSE_GRAFANA_PASSWORD",
    }


def test_no_secret_is_written_in_the_compose_file() -> None:
    assert secret_problems(load_compose(), COMPOSE.read_text()) == []


def test_the_known_variables_come_from_every_settings_class() -> None:
    known = known_beamline_variables()
    # one field per class, as a check that discovery found them all
    assert {
        "BEAMLINE_NATS_URL",
        "BEAMLINE_GATEWAY_CONCURRENCY",
        "BEAMLINE_RECORDER_BATCH_SIZE",
        "BEAMLINE_AGENT_SHARDS",
        "BEAMLINE_FAKELLM_SCRIPT",
    } <= known


def test_the_providers_reach_fakellm_by_its_compose_hostname() -> None:
    compose = load_compose()
    gateway = compose["services"]["gateway"]
    with mock.patch.dict(os.environ, container_env(gateway), clear=True):
        deployment = config.load(deployment_file(gateway, ROOT))
    assert {p.base_url for p in deployment.providers.values()} == {"http://fakellm:8399/v1"}


def test_a_host_key_reaches_the_gateway_only_from_the_host() -> None:
    compose = load_compose()
    gateway = compose["services"]["gateway"]
    assert "FAKELLM_API_KEY" not in container_env(gateway)
    assert container_env(gateway, {"FAKELLM_API_KEY": "from-host"})["FAKELLM_API_KEY"] == (
        "from-host"
    )
    for name, service in compose["services"].items():
        if name != "gateway":
            assert not any(_KEY_NAME.search(var) for var in environment(service)), name


def nats_server_check(
    config: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`nats-server -t` with a nats container's environment (by default the single server's,
    with its password defaults)."""
    env = env if env is not None else container_env(load_compose()["services"]["nats"])
    return subprocess.run(
        [nats_server_binary(), "-c", str(config), "-t"],
        capture_output=True,
        timeout=30,
        env={"PATH": os.environ.get("PATH", ""), **env},
        check=False,
    )


def test_the_nats_config_is_valid_and_sets_sync_interval_consciously() -> None:
    compose = load_compose()
    nats = compose["services"]["nats"]
    mounted = _mounts(nats)
    config_path = nats["command"][nats["command"].index("-c") + 1]
    assert (ROOT / mounted[config_path]).resolve() == NATS_CONF
    text = NATS_CONF.read_text()
    assert re.search(r"^\s*sync_interval:\s*\S+", text, re.MULTILINE)
    # an include is read beside the config: in the container as in the repository
    for include in re.findall(r'^\s*include\s+"([^"]+)"', text, re.MULTILINE):
        inside = str(Path(config_path).parent / include)
        assert (ROOT / mounted[inside]).resolve() == NATS_CONF.parent / include
    done = nats_server_check(NATS_CONF)
    assert done.returncode == 0, done.stderr


def test_each_cluster_node_config_is_valid() -> None:
    compose = load_cluster()
    for name, node in nats_nodes(compose).items():
        assert (ROOT / _mounts(node)[_config_of(node)]).resolve() == CLUSTER_CONF, name
        env = {k: interpolate(v, {}) for k, v in environment(node).items() if v is not None}
        done = nats_server_check(CLUSTER_CONF, env)
        assert done.returncode == 0, (name, done.stderr)


def test_nats_server_rejects_a_broken_config(tmp_path: Path) -> None:
    broken = tmp_path / "nats.conf"
    broken.write_text(NATS_CONF.read_text().replace("sync_interval: 1s", "sync_interval: soon"))
    (tmp_path / "auth.conf").write_text((NATS_CONF.parent / "auth.conf").read_text())
    done = nats_server_check(broken)
    assert done.returncode != 0
    assert b"sync_interval" in done.stderr + done.stdout


# --- broken copies: each check can fail --------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("condition: service_healthy", "condition: healthy", "depends_on"),
        ('ports: ["127.0.0.1:8123:8123"]', "ports: 8123", "ports"),
        ("\nservices:\n", "\nservice:\n", "'service' does not match"),
        ("retries: 12", "retry: 12", "healthcheck: 'retry' does not match"),
    ],
)
def test_the_schema_rejects_a_broken_copy(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = COMPOSE.read_text()
    assert old in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    problems = schema_problems(broken)
    assert problems
    assert any(message in p for p in problems), problems


def _services(c: Compose) -> dict[str, Any]:
    services: dict[str, Any] = c["services"]
    return services


def _each_env(c: Compose) -> Iterator[dict[str, Any]]:
    for service in beamline_services(c).values():
        yield service["environment"]


def _drop(var: str) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        for env in _each_env(c):
            env.pop(var, None)

    return mutate


def _set(var: str, value: str | None, service: str | None = None) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        if service:
            _services(c)[service]["environment"][var] = value
        else:
            for env in _each_env(c):
                env[var] = value

    return mutate


def _command(service: str, command: list[str]) -> Callable[[Compose], None]:
    return lambda c: _services(c)[service].update(command=command)


def _drop_volumes(c: Compose) -> None:
    c["volumes"].pop("nats-data")


def _depends(service: str, dep: str, condition: str) -> Callable[[Compose], None]:
    return lambda c: _services(c)[service]["depends_on"].update({dep: {"condition": condition}})


def _drop_healthcheck(c: Compose) -> None:
    _services(c)["clickhouse"].pop("healthcheck")


def _expose(c: Compose) -> None:
    _services(c)["nats"]["ports"] = ["4222:4222"]


def _bind_missing(c: Compose) -> None:
    _services(c)["nats"]["volumes"].append("./infra/nats/missing.conf:/etc/x.conf:ro")


def _drop_nats_password(c: Compose) -> None:
    _services(c)["nats"]["environment"].pop("NATS_INIT_PASSWORD")


def _drop_mount(service: str, fragment: str) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        volumes = _services(c)[service]["volumes"]
        volumes[:] = [v for v in volumes if fragment not in str(v)]

    return mutate


@pytest.mark.parametrize(
    ("check", "mutate", "message"),
    [
        (command_problems, _command("gateway", ["python", "-m", "services.gatewy"]), "gatewy"),
        (command_problems, _command("gateway", ["beamline", "up"]), "is not"),
        (command_problems, _command("gateway", ["node", "gateway.js"]), "is not"),
        (command_problems, _command("init", ["beamline", "iniit"]), "invalid choice"),
        (variable_problems, _set("BEAMLINE_NATS_URI", "nats://nats:4222"), "BEAMLINE_NATS_URI"),
        (variable_problems, _set("BEAMLINE_RECORDER_BATCH", "10", "recorder"), "BATCH"),
        (variable_problems, _drop("BEAMLINE_NATS_URL"), "BEAMLINE_NATS_URL"),
        (variable_problems, _drop("BEAMLINE_CLICKHOUSE_URL"), "BEAMLINE_CLICKHOUSE_URL"),
        (
            variable_problems,
            _set("BEAMLINE_CLICKHOUSE_URL", "http://localhost:8123/default"),
            "BEAMLINE_CLICKHOUSE_URL",
        ),
        (deployment_problems, _drop("BEAMLINE_FAKELLM_URL"), "127.0.0.1"),
        (deployment_problems, _set("BEAMLINE_CONFIG", "/app/infra/nope.yaml"), "lacks"),
        (
            deployment_problems,
            lambda c: _services(c)["gateway"]["environment"].pop("FAKELLM_API_KEY"),
            "FAKELLM_API_KEY",
        ),
        (volume_problems, _drop_volumes, "nats-data"),
        (volume_problems, _bind_missing, "missing.conf"),
        (port_problems, _expose, "4222"),
        (health_problems, _depends("recorder", "nats", "service_started"), "service_healthy"),
        (health_problems, _depends("agent-host", "init", "service_healthy"), "no healthcheck"),
        (health_problems, _depends("agent-host", "prometheus", "service_started"), "unknown"),
        (health_problems, _drop_healthcheck, "clickhouse"),
        (nats_user_problems, _set("BEAMLINE_NATS_USER", "admin", "agent-host"), "'agent'"),
        (
            nats_user_problems,
            _set("BEAMLINE_NATS_PASSWORD", "${NATS_AGENT_PASSWORD:-other}", "agent-host"),
            "NATS_AGENT_PASSWORD",
        ),
        (nats_user_problems, _drop("BEAMLINE_NATS_USER"), "recorder"),
        (nats_user_problems, _drop_nats_password, "NATS_INIT_PASSWORD"),
        (nats_user_problems, _drop_mount("nats", "auth.conf"), "auth.conf"),
        (
            clickhouse_user_problems,
            _set(
                "BEAMLINE_CLICKHOUSE_URL",
                "http://writer:${CLICKHOUSE_WRITER_PASSWORD:-writer}@clickhouse:8123/default",
                "gateway",
            ),
            "not 'readonly'",
        ),
        (
            clickhouse_user_problems,
            _set(
                "BEAMLINE_CLICKHOUSE_URL",
                "http://beamline:${CLICKHOUSE_PASSWORD:-beamline}@clickhouse:8123/default",
                "recorder",
            ),
            "not 'writer'",
        ),
        (clickhouse_user_problems, _drop_mount("clickhouse", "users.xml"), "users.d"),
        (
            clickhouse_user_problems,
            lambda c: _services(c)["clickhouse"]["environment"].pop("CLICKHOUSE_WRITER_PASSWORD"),
            "CLICKHOUSE_WRITER_PASSWORD is not set",
        ),
        (
            clickhouse_user_problems,
            _set("BEAMLINE_CLICKHOUSE_URL", "http://readonly:x@clickhouse:8123/default", "init"),
            "not 'writer'",
        ),
        (lifecycle_problems, lambda c: _services(c)["init"].update(restart="always"), "restart"),
        (
            lifecycle_problems,
            lambda c: _services(c)["agent-host"].update(
                depends_on={"nats": {"condition": "service_healthy"}}
            ),
            "agent-host: connects to NATS but does not wait for init",
        ),
        (
            lifecycle_problems,
            lambda c: _services(c)["gateway"]["healthcheck"].update(
                test=["CMD", "python", "-m", "beamline.health", "agent"]
            ),
            "gateway: healthcheck",
        ),
        (lifecycle_problems, lambda c: _services(c)["recorder"].pop("healthcheck"), "recorder"),
        (lifecycle_problems, lambda c: _services(c).pop("init"), "want one init job"),
        (grafana_problems, _set("CLICKHOUSE_HTTP_PORT", None, "grafana"), "CLICKHOUSE_HTTP_PORT"),
        (
            grafana_problems,
            _set("GF_PLUGINS_PREINSTALL_SYNC", "grafana-clickhouse-datasource", "grafana"),
            "GF_PLUGINS_PREINSTALL_SYNC",
        ),
        (
            grafana_problems,
            lambda c: _services(c)["grafana"].update(image="grafana/grafana:latest"),
            "not pinned",
        ),
        (grafana_problems, _set("CLICKHOUSE_GRAFANA_USER", "writer", "grafana"), "readonly"),
        (
            grafana_problems,
            _set("CLICKHOUSE_GRAFANA_PASSWORD", "${CLICKHOUSE_WRITER_PASSWORD:-writer}", "grafana"),
            "password",
        ),
        (grafana_problems, _set("CLICKHOUSE_HOST", "localhost", "grafana"), "'localhost'"),
        (grafana_problems, _drop_mount("grafana", "provisioning"), "provisioning"),
        (grafana_problems, _drop_mount("grafana", "dashboards"), "dashboards"),
        (
            grafana_problems,
            lambda c: _services(c)["grafana"]["healthcheck"].update(test=["CMD", "true"]),
            "/api/health",
        ),
    ],
)
def test_each_check_rejects_a_broken_copy(
    check: Callable[[Compose], list[str]], mutate: Callable[[Compose], None], message: str
) -> None:
    compose = copy.deepcopy(load_compose())
    for service in beamline_services(compose).values():  # unshare the anchored mapping
        service["environment"] = dict(service["environment"])
    mutate(compose)
    problems = check(compose)
    assert any(message in p for p in problems), problems


def _node_env(node: str, var: str, value: str | None) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        if value is None:
            _services(c)[node]["environment"].pop(var)
        else:
            _services(c)[node]["environment"][var] = value

    return mutate


@pytest.mark.parametrize(
    ("check", "mutate", "message"),
    [
        (cluster_problems, _node_env("nats-3", "NATS_SERVER_NAME", "nats-2"), "distinct"),
        (cluster_problems, _node_env("nats-2", "NATS_ROUTE_PASSWORD", "${OTHER}"), "the same"),
        (cluster_problems, _node_env("nats-2", "NATS_ROUTE_3", None), "nats-2: routes"),
        (
            cluster_problems,
            _node_env("nats", "NATS_ROUTE_2", "nats-route://nats-2:6222"),
            "nats: NATS_ROUTE_2 must be",
        ),
        (
            cluster_problems,
            _set("NATS_ROUTE_PASSWORD", "${NATS_ROUTE_PASSWORD}", "gateway"),
            "route",
        ),
        (
            cluster_problems,
            _set("BEAMLINE_NATS_URL", "nats://nats:4222", "agent-host"),
            "every node",
        ),
        (cluster_problems, _set("BEAMLINE_STREAM_REPLICAS", "1", "init"), "must be 3"),
        (
            cluster_problems,
            lambda c: _services(c)["init"]["depends_on"].pop("nats-3"),
            "every node healthy",
        ),
        (
            cluster_problems,
            lambda c: _services(c)["nats-3"].update(volumes=["./infra/nats/auth.conf:/x:ro"]),
            "nats-3: does not run",
        ),
        (nats_user_problems, _node_env("nats-2", "NATS_ADMIN_PASSWORD", None), "nats-2"),
        (nats_user_problems, _node_env("nats-3", "NATS_AGENT_PASSWORD", "${X:-x}"), "differs"),
    ],
)
def test_each_cluster_check_rejects_a_broken_copy(
    check: Callable[[Compose], list[str]], mutate: Callable[[Compose], None], message: str
) -> None:
    compose = copy.deepcopy(load_cluster())
    for service in compose["services"].values():  # unshare anchored mappings
        for key in ("environment", "depends_on"):
            if key in service:
                service[key] = dict(service[key])
    mutate(compose)
    problems = check(compose)
    assert any(message in p for p in problems), problems


def test_a_provisioning_variable_grafana_lacks_is_named(tmp_path: Path) -> None:
    shutil.copytree(GRAFANA_PROVISIONING, tmp_path / "provisioning")
    datasource = tmp_path / "provisioning/datasources/clickhouse.yaml"
    datasource.write_text(
        datasource.read_text().replace("defaultTable: bl_messages", "defaultTable: $TABLE_X")
        + "# $IN_A_COMMENT is not read\n"
    )
    problems = grafana_problems(load_compose(), tmp_path / "provisioning")
    assert problems == [
        "grafana: provisioning datasources/clickhouse.yaml reads $TABLE_X, which is not set"
    ]


def test_a_deployment_variable_without_default_must_be_set(tmp_path: Path) -> None:
    (tmp_path / "infra/examples").mkdir(parents=True)
    text = (ROOT / "infra/examples/research-team.yaml").read_text()
    (tmp_path / "infra/examples/research-team.yaml").write_text(
        text.replace("${BEAMLINE_FAKELLM_URL:-http://127.0.0.1:8399}", "${LLM_HOST}")
    )
    assert any("LLM_HOST" in p for p in deployment_problems(load_compose(), tmp_path))


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("OPENAI_API_KEY", "sk-proj-" + "a1B2c3D4" * 4, "OPENAI_API_KEY"),
        ("OPENAI_API_KEY", "${SOME_OTHER_VAR}", "OPENAI_API_KEY"),
        ("CLICKHOUSE_PASSWORD", "hunter2", "CLICKHOUSE_PASSWORD"),
        ("BEAMLINE_CLICKHOUSE_URL", "http://beamline:hunter2@clickhouse:8123/", "literal password"),
    ],
)
def test_the_secret_check_rejects_a_written_secret(var: str, value: str, message: str) -> None:
    compose = copy.deepcopy(load_compose())
    gateway = compose["services"]["gateway"]
    gateway["environment"] = {**gateway["environment"], var: value}
    problems = secret_problems(compose, COMPOSE.read_text() + f"\n# {value}\n")
    assert any(message in p for p in problems), problems


def test_the_text_scan_finds_a_key_shaped_literal() -> None:
    text = COMPOSE.read_text().replace("OPENAI_API_KEY:", "OPENAI_API_KEY: sk-ant-" + "x9" * 20)
    assert any("key-shaped" in p for p in secret_problems(load_compose(), text))
