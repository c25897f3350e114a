"""Settings shared by every service, from `BEAMLINE_*` environment variables.

Each service adds its own class with the prefix `BEAMLINE_<SERVICE>_`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class MeshSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BEAMLINE_", extra="ignore")

    nats_url: str = Field(
        default="nats://127.0.0.1:4222",
        description="NATS server(s), comma separated. `beamline up` starts one when unset.",
    )
    nats_user: str | None = Field(
        default=None,
        description="NATS user (one per role: agent, gateway, recorder, supervisor, budget, "
        "loopguard, admin, client, init). `beamline up` gives each service its own.",
    )
    nats_password: SecretStr | None = Field(default=None, description="That user's password.")
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
    stream_replicas: int = Field(
        default=1,
        ge=1,
        le=5,
        description="Replicas of each JetStream stream and bucket that `beamline init` "
        "declares: 1 on a single server, 3 on a 3-node cluster. `beamline up`, which "
        "declares the layout without this, keeps an existing stream's replicas.",
    )
    layout_wait_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="How long a service waits at start for the streams and buckets that "
        "`beamline init` declares, then exits naming what is missing.",
    )
    config: Path = Field(
        default=Path("infra/examples/research-team.yaml"),
        description="The YAML file declaring agents (and, later, supervisors).",
    )
    log_level: str = Field(default="INFO")

    @property
    def resolved_clickhouse_url(self) -> str:
        return self.clickhouse_url or f"chdb://{(self.data_dir / 'clickhouse').resolve()}"


class RetentionSettings(BaseSettings):
    """How long ClickHouse keeps what the recorder writes, from `BEAMLINE_RETENTION_*`.

    Applied as a table TTL by every migration (`beamline db migrate`, and the recorder when it
    starts) with ALTER TABLE ... MODIFY TTL, so a new value takes effect on the next start.
    Rows go when the engine merges parts, not at the stroke of the day. 0 keeps rows forever.
    """

    model_config = SettingsConfigDict(env_prefix="BEAMLINE_RETENTION_", extra="ignore")

    bl_messages_days: int = Field(
        default=90,
        ge=0,
        le=36_500,
        description="Days a recorded message is kept (TTL on bl_messages.ts); 0: forever. "
        "Messages are the record everything else is read from, and they compress well.",
    )
    bl_messages_by_trace_days: int = Field(
        default=30,
        ge=0,
        le=36_500,
        description="Days a message is also kept sorted by trace (bl_messages_by_trace), "
        "for one-read trace lookups; 0: forever. It costs about the storage of bl_messages; "
        "older traces are still found, through bl_messages_id_ts, more slowly.",
    )
    otel_traces_days: int = Field(
        default=30,
        ge=0,
        le=36_500,
        description="Days a span is kept (otel_traces and its trace-id lookup table); "
        "0: forever. Spans are the trace view of the messages, which stay longer.",
    )
