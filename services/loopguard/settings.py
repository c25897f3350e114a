"""Loop guard settings: `BEAMLINE_LOOPGUARD_*`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class LoopguardSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BEAMLINE_LOOPGUARD_", extra="ignore")

    fetch_batch: int = Field(
        default=256, ge=1, le=10_000, description="Journal entries fetched per pull."
    )
    linger_s: float = Field(
        default=0.05,
        ge=0,
        le=5,
        description="After a pull that was not full, wait this long for more entries: a loop "
        "is seen this much later, and a busy mesh costs one pull per batch, not per entry.",
    )
    position_flush_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="How often the journal position is persisted when it moved: a restart "
        "after a crash reads again at most this much of the journal.",
    )
    supervisor_timeout_s: float = Field(
        default=10.0, gt=0, description="For the leading supervisor's answer to a command."
    )
    retry_s: float = Field(
        default=1.0, gt=0, description="How often an unanswered command is sent again."
    )
    tick_s: float = Field(
        default=0.5, gt=0, description="How often escalation deadlines are checked."
    )
    answer_wait_s: float = Field(
        default=10.0,
        gt=0,
        description="How long an answer waits for the supervisor to carry it out before "
        "replying that it will be (it is persisted, and re-sent until then).",
    )
    conversations: int = Field(
        default=10_000,
        ge=1,
        description="Conversations kept in memory; others are replayed from the journal.",
    )
