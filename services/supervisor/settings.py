"""Supervisor settings: `BEAMLINE_SUPERVISOR_*`."""

from __future__ import annotations

import os
import socket

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SupervisorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BEAMLINE_SUPERVISOR_", extra="ignore")

    instance_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}".replace(".", "-"),
        description="Names this instance in the leader lease.",
    )
    heartbeat_misses: int = Field(
        default=4, ge=2, description="Missed host heartbeats before the host counts as lost."
    )
    lease_s: float = Field(
        default=1.0, gt=0, description="A leader silent this long is replaced by a standby."
    )
    hung_after_s: float = Field(
        default=600.0,
        gt=0,
        description="A busy agent whose state has not changed for this long is killed as hung.",
    )
    settle_s: float = Field(
        default=1.0, ge=0, description="On first start, wait this long for hosts to announce."
    )
    command_timeout_s: float = Field(default=5.0, gt=0, description="For a host's answer.")
    rebalance_on_join: bool = Field(
        default=True,
        description="A host that joins takes its fair share of mailbox shards from the most "
        "loaded hosts; their agents move (stopped within their shutdown, started there).",
    )
