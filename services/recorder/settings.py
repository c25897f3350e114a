"""Recorder settings, from `BEAMLINE_RECORDER_*` (plus the shared `BEAMLINE_*` MeshSettings)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RecorderSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BEAMLINE_RECORDER_", extra="ignore")

    batch_size: int = Field(
        default=2000, ge=1, le=100_000, description="Insert when this many messages wait."
    )
    flush_interval_ms: int = Field(
        default=200,
        ge=1,
        le=600_000,
        description="...or when the oldest waiting message is this old.",
    )
    fetch_batch: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Messages asked for per pull request, per stream; asks again at half.",
    )
    pull_expires_s: float = Field(
        default=5.0,
        ge=0.5,
        le=300,
        description="Lifetime of a pull request: the longest pause after a lost request.",
    )
    ack_wait_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Consumer ack wait: an unacked message is redelivered after this.",
    )
    max_ack_pending: int = Field(
        default=20_000, ge=1, description="Consumer limit on messages delivered but not acked."
    )
    max_redeliveries: int = Field(
        default=10,
        ge=1,
        description=(
            "Failed inserts of one batch (when ClickHouse is reachable but refuses it) before "
            "the recorder splits the batch to isolate the refused rows, which it stores as "
            "raw rows with reason `poison`. JetStream never drops a message (max_deliver=-1)."
        ),
    )
    backoff_initial_s: float = Field(default=0.2, gt=0, description="First retry delay.")
    backoff_max_s: float = Field(default=30.0, gt=0, description="Retry delay cap (with jitter).")
    stop_timeout_s: float = Field(
        default=10.0,
        ge=0,
        description="On SIGTERM, how long to keep retrying the last insert before giving the "
        "messages back to JetStream (nak) and exiting.",
    )
    query_timeout_s: float = Field(
        default=10.0, gt=0, le=600, description="max_execution_time of bl.query.sql queries."
    )
    query_max_rows: int = Field(
        default=10_000, ge=1, description="max_result_rows of bl.query.sql queries."
    )
    # OTLP export (services/recorder/otlp.py): on when OTEL_EXPORTER_OTLP_ENDPOINT is set
    otlp_queue_size: int = Field(
        default=20_000,
        ge=1,
        le=10_000_000,
        description="Spans held for OTLP export; beyond it new spans are dropped and counted "
        "(they stay in ClickHouse).",
    )
    otlp_batch_size: int = Field(
        default=512, ge=1, le=100_000, description="Spans per OTLP export request."
    )
    otlp_interval_ms: int = Field(
        default=1000,
        ge=1,
        le=600_000,
        description="A partial batch of spans is exported after waiting this long.",
    )
    otlp_max_attempts: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Export calls for one batch (each retrying transient errors within "
        "OTEL_EXPORTER_OTLP_TIMEOUT) before its spans are dropped and counted.",
    )
    crash_after_insert: bool = Field(
        default=False,
        description="FAULT INJECTION, tests only: os._exit(137) right after the first "
        "successful insert and before acking it (the crash window insert->ack).",
    )
