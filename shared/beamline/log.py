"""Structured logs: one JSON object per line, carrying the trace and envelope ids."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from beamline.envelope import Envelope

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("nats", "httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("beamline").info("starting", extra={"service": service})


def ctx(env: Envelope | None = None, **fields: Any) -> dict[str, Any]:
    """`extra=` for a log call about an envelope: its trace, id, kind and conversation."""
    out: dict[str, Any] = {}
    if env is not None:
        out.update(
            trace_id=env.trace_id,
            envelope_id=env.id,
            kind=env.kind.value,
            conversation_id=env.conversation_id,
        )
    out.update(fields)
    return out
