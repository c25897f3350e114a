"""Budget service settings: `BEAMLINE_BUDGET_*`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class BudgetSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BEAMLINE_BUDGET_", extra="ignore")

    reservation_ttl_s: float = Field(
        default=150.0,
        gt=0,
        description="A reservation not settled by then is charged at its estimate. Keep it "
        "above the gateway's deadline (BEAMLINE_GATEWAY_DEADLINE_S, 90 s) so a slow call "
        "settles with its real usage.",
    )
    late_window_s: float = Field(
        default=3600.0,
        ge=0,
        description="How long an expired reservation waits for a late outcome that corrects "
        "its charge to the actual usage.",
    )
    sweep_s: float = Field(default=1.0, gt=0, description="How often expired holds are charged.")
    report_retry_s: float = Field(
        default=1.0, gt=0, description="How often an unacknowledged exhaustion is re-sent."
    )
    supervisor_timeout_s: float = Field(
        default=5.0, gt=0, description="For the leading supervisor's acknowledgement."
    )
    fetch_batch: int = Field(
        default=256, ge=1, le=10_000, description="Call events settled per ledger write."
    )
    settle_linger_s: float = Field(
        default=0.1,
        ge=0,
        le=5,
        description="After a batch of call events that was not full, wait this long for more: "
        "one ledger write settles them together (spend shows this much later; holds cover "
        "the calls meanwhile).",
    )
    itemisation_flush_s: float = Field(
        default=2.0,
        gt=0,
        description="How often the per-conversation itemisation is persisted when it changed "
        "(a crash loses at most this much of it; spend is persisted with every change).",
    )
