"""Agent host settings: `BEAMLINE_AGENT_*`."""

from __future__ import annotations

import os
import re
import socket

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from beamline.guard import Addendum


class AgentHostSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BEAMLINE_AGENT_", extra="ignore")

    host_id: str = Field(
        default_factory=lambda: _token(f"{socket.gethostname()}-{os.getpid()}"),
        description="Unique per host process; a subject token.",
    )
    labels: str = Field(default="", description="Placement labels: tier=hot,provider=anthropic")
    shards: str = Field(
        default="auto",
        description="Mailbox shards this host owns: auto (the supervisor assigns them when the "
        "deployment declares supervisors, else all) | all | 0,1,5",
    )
    heartbeat_s: float = Field(default=0.25, gt=0, description="Heartbeat interval.")
    llm_timeout_s: float = Field(default=300.0, gt=0, description="Wait for the gateway.")
    transient_retries: int = Field(default=5, ge=0, description="Before a task fails.")
    breaker_recheck_s: float = Field(
        default=10.0,
        gt=0,
        description="A provider whose breaker this host last saw open is tried again after "
        "this long even without news (the gateway refuses at once if it is still open).",
    )
    retry_base_s: float = Field(default=0.5, gt=0)
    retry_cap_s: float = Field(default=10.0, gt=0)
    bug_retries: int = Field(default=2, ge=0, description="Unexpected errors before poison.")
    max_deliveries: int = Field(default=5, ge=1, description="Redeliveries before poison.")
    max_in_flight: int = Field(default=5000, ge=1, description="Held messages per shard.")
    ack_wait_s: float = Field(default=300.0, gt=0)

    @field_validator("host_id")
    @classmethod
    def _host_is_token(cls, value: str) -> str:
        if _token(value) != value:
            raise ValueError(f"{value!r}: use 1-128 of A-Z a-z 0-9 _ -")
        return value

    def label_map(self) -> dict[str, str]:
        pairs = [p.strip() for p in self.labels.split(",") if p.strip()]
        bad = [p for p in pairs if p.count("=") != 1]
        if bad:
            raise ValueError(f"BEAMLINE_AGENT_LABELS: {bad} are not key=value")
        return dict(p.split("=") for p in pairs)

    def owned_shards(self, total: int, supervised: bool = False) -> list[int] | None:
        """The static shards of this host, or None: the supervisor assigns them."""
        mode = self.shards.strip()
        if mode == "auto":
            return None if supervised else list(range(total))
        if mode == "all":
            return list(range(total))
        wanted = sorted({int(s) for s in self.shards.split(",") if s.strip()})
        bad = [s for s in wanted if not 0 <= s < total]
        if bad:
            raise ValueError(f"BEAMLINE_AGENT_SHARDS: {bad} outside 0..{total - 1}")
        return wanted


class SoloSettings(BaseSettings):
    """What an isolated agent's process is told by the host that starts it
    (`BEAMLINE_SOLO_*`); the rest it inherits: the mesh's and the host's own settings,
    `BEAMLINE_AGENT_HOST_ID` included, so it consumes the mailbox the host was assigned."""

    model_config = SettingsConfigDict(env_prefix="BEAMLINE_SOLO_", extra="ignore")

    agent: str = Field(description="The agent this process runs.")
    generation: int = Field(ge=0, description="The incarnation the supervisor started.")
    parent_pid: int = Field(gt=0, description="The host's pid: this process dies with it.")
    addendum: str = Field(
        default="", description="The loop guard's addendum (JSON of beamline.guard.Addendum)."
    )

    def guard_addendum(self) -> Addendum | None:
        return Addendum.model_validate_json(self.addendum) if self.addendum else None


def _token(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", text)[:128]
