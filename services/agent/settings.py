"""Agent host settings: `BEAMLINE_AGENT_*`."""

from __future__ import annotations

import os
import socket

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AgentHostSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BEAMLINE_AGENT_", extra="ignore")

    host_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    shards: str = Field(default="all", description="Mailbox shards this host owns: all | 0,1,5")
    llm_timeout_s: float = Field(default=300.0, gt=0, description="Wait for the gateway.")
    transient_retries: int = Field(default=5, ge=0, description="Before a task fails.")
    retry_base_s: float = Field(default=0.5, gt=0)
    retry_cap_s: float = Field(default=10.0, gt=0)
    bug_retries: int = Field(default=2, ge=0, description="Unexpected errors before poison.")
    max_deliveries: int = Field(default=5, ge=1, description="Redeliveries before poison.")
    max_in_flight: int = Field(default=5000, ge=1, description="Held messages per shard.")
    ack_wait_s: float = Field(default=300.0, gt=0)

    def owned_shards(self, total: int) -> list[int]:
        if self.shards.strip() == "all":
            return list(range(total))
        wanted = sorted({int(s) for s in self.shards.split(",") if s.strip()})
        bad = [s for s in wanted if not 0 <= s < total]
        if bad:
            raise ValueError(f"BEAMLINE_AGENT_SHARDS: {bad} outside 0..{total - 1}")
        return wanted
