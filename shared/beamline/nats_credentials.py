"""Who connects to NATS as whom: the embedded mesh's generated passwords (a 0600 file in the
data directory), credentials in a URL or in BEAMLINE_NATS_USER/_PASSWORD, and URLs without
them for logs. The permission model itself is `beamline.nats_auth`."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import SplitResult, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, SecretStr

from beamline.nats_auth import CREDENTIALS_FILE, SERVICE_ROLES, Role, User, password_env
from beamline.settings import MeshSettings


class Credentials(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    user: str
    password: SecretStr


class MeshCredentials(BaseModel):
    """The embedded mesh's generated passwords and the URL they are for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    passwords: dict[str, SecretStr]

    @classmethod
    def generate(cls, url: str, users: Iterable[User]) -> MeshCredentials:
        return cls(url=url, passwords={u.name: SecretStr(secrets.token_urlsafe(24)) for u in users})

    def for_user(self, user: str) -> Credentials:
        return Credentials(user=user, password=self.passwords[user])

    def save(self, path: Path) -> None:
        plain = {k: v.get_secret_value() for k, v in self.passwords.items()}
        write_private(path, json.dumps({"url": self.url, "passwords": plain}, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> MeshCredentials | None:
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, whatever the umask or an older copy allowed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def _split(url: str) -> SplitResult:
    return urlsplit(url if "://" in url else f"nats://{url}")


def without_credentials(url: str) -> str:
    """Every server of a comma-separated URL list, without user and password."""
    if not url:
        return url
    out = []
    for server in url.split(","):
        parts = _split(server.strip())
        host = parts.netloc.rsplit("@", 1)[-1]
        out.append(urlunsplit(parts._replace(netloc=host)))
    return ",".join(out)


def with_credentials(url: str, credentials: Credentials) -> str:
    parts = _split(url)
    secret = credentials.password.get_secret_value()
    return urlunsplit(parts._replace(netloc=f"{credentials.user}:{secret}@{parts.netloc}"))


def resolve(
    url: str, credentials: Credentials | None = None
) -> tuple[list[str], Credentials | None]:
    """The servers (without credentials, so none reach a log) and who to connect as: the
    given credentials, else those in the URL, else BEAMLINE_NATS_USER/_PASSWORD."""
    servers = without_credentials(url).split(",")
    if credentials is None:
        for server in url.split(","):
            parts = _split(server.strip())
            if parts.username:
                secret = SecretStr(parts.password or "")
                credentials = Credentials(user=parts.username, password=secret)
                break
    if credentials is None:
        settings = MeshSettings()
        if settings.nats_user:
            password = settings.nats_password or SecretStr("")
            credentials = Credentials(user=settings.nats_user, password=password)
    return servers, credentials


def embedded_admin(settings: MeshSettings) -> Credentials | None:
    """The operator's credentials for the embedded mesh of `settings.data_dir`, when nothing
    else names a user and that mesh's file is for the URL in `settings`."""
    if settings.nats_user or _split(settings.nats_url.split(",")[0]).username:
        return None
    mesh = MeshCredentials.load(settings.data_dir / CREDENTIALS_FILE)
    if mesh is None or mesh.url != without_credentials(settings.nats_url):
        return None
    return mesh.for_user(Role.ADMIN.value)


def service_env(service: str, mesh: MeshCredentials | None) -> dict[str, str]:
    """BEAMLINE_NATS_USER/_PASSWORD for a service process: its role, with the embedded
    mesh's password, or else the one the operator exported as NATS_<ROLE>_PASSWORD."""
    role = SERVICE_ROLES.get(service)
    if role is None:
        return {}
    if mesh is not None:
        password = mesh.passwords[role.value].get_secret_value()
    else:
        password = os.environ.get(password_env(role.value), "")
    return {"BEAMLINE_NATS_USER": role.value, "BEAMLINE_NATS_PASSWORD": password}
