"""Gateway settings from `BEAMLINE_GATEWAY_*` environment variables (providers come from
the deployment YAML, shared settings from `MeshSettings`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BEAMLINE_GATEWAY_", extra="ignore")

    concurrency: int = Field(
        default=64, ge=1, le=10_000, description="LLM requests handled at once (most wait on HTTP)."
    )
    deadline_s: float = Field(
        default=90.0,
        gt=0,
        description="Every request is answered within this, retries included. Keep it below "
        "the requester's own timeout so the requester hears why instead of timing out.",
    )
    backoff_base_s: float = Field(default=0.5, gt=0, description="First retry waits up to this.")
    backoff_cap_s: float = Field(default=8.0, gt=0, description="No backoff wait is longer.")
    retry_after_cap_s: float = Field(
        default=30.0, ge=0, description="A provider's Retry-After is honoured up to this."
    )
    budget_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="For the budget service's answer to a reservation; without one, a call "
        "by an agent with a budget is not made (budget_unavailable).",
    )
    stop_grace_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight requests may finish."
    )
