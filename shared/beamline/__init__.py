"""Beamline: an OTP-style runtime for LLM agents on NATS.

The public surface for people writing agents, tools and clients.
"""

from beamline.client import await_reply, submit
from beamline.envelope import (
    ChatMessage,
    Envelope,
    Kind,
    ReplyPayload,
    TaskPayload,
    ToolCall,
    Usage,
)
from beamline.errors import BeamlineError, CallerError, ConfigError, Reason, TransientError
from beamline.tools import tool

__all__ = [
    "BeamlineError",
    "CallerError",
    "ChatMessage",
    "ConfigError",
    "Envelope",
    "Kind",
    "Reason",
    "ReplyPayload",
    "TaskPayload",
    "ToolCall",
    "TransientError",
    "Usage",
    "await_reply",
    "submit",
    "tool",
]
