"""Settings shared by every service, from `BEAMLINE_*` environment variables.

Each service adds its own class with the prefix `BEAMLINE_<SERVICE>_`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class MeshSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BEAMLINE_", extra="ignore")

    nats_url: str = Field(
        default="nats://127.0.0.1:4222",
        description="NATS server(s), comma separated. `beamline up` starts one when unset.",
    )
    data_dir: Path = Field(default=Path(".beamline"), description="Embedded runtime state.")
    clickhouse_url: str = Field(
        default="",
        description="chdb://PATH (embedded, default DATA_DIR/clickhouse) or http(s)://server.",
    )
    max_message_bytes: int = Field(
        default=256 * 1024, gt=0, description="Larger messages are dead-lettered as oversized."
    )
    mailbox_shards: int = Field(
        default=32, ge=1, le=1024, description="Mailbox partitions (one durable consumer each)."
    )
    config: Path = Field(
        default=Path("infra/examples/research-team.yaml"),
        description="The YAML file declaring agents (and, later, supervisors).",
    )
    log_level: str = Field(default="INFO")

    @property
    def resolved_clickhouse_url(self) -> str:
        return self.clickhouse_url or f"chdb://{(self.data_dir / 'clickhouse').resolve()}"
