"""The one envelope for everything on the mesh, and its typed payloads.

JSON on the wire so `nats pub` and any language can take part. The envelope id is a UUIDv7
(time-ordered), doubles as `Nats-Msg-Id` for JetStream de-duplication and as the ClickHouse
row key, so a message published or recorded twice stays one message.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from beamline.ids import new_span_id, new_trace_id, uuid7

SCHEMA_VERSION = 1


class Kind(StrEnum):
    TASK = "task"
    REPLY = "reply"
    ERROR = "error"
    LLM_REQUEST = "llm_request"
    LLM_RESPONSE = "llm_response"
    TOOL_RESULT = "tool_result"
    SUMMARY = "summary"
    EVENT = "event"
    DEAD_LETTER = "dead_letter"


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Usage(Frozen):
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


# --- chat, provider-neutral (the OpenAI shape; the gateway maps it to each provider) ----


class ToolCall(Frozen):
    id: str
    name: str
    arguments: str = "{}"  # JSON text, exactly as the model produced it


class ChatMessage(Frozen):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # on role="tool": which call this answers


class ToolSpec(Frozen):
    name: str
    description: str
    parameters: dict[str, Any]  # JSON Schema of the arguments


# --- payloads, one per kind -------------------------------------------------------------


class TaskPayload(Frozen):
    kind: Literal["task"] = "task"
    prompt: str = Field(min_length=1)
    reply_to: str | None = None  # an extra core-NATS subject to send the reply to
    metadata: dict[str, str] = Field(default_factory=dict)


class ReplyPayload(Frozen):
    kind: Literal["reply"] = "reply"
    task_id: str
    text: str


class ErrorPayload(Frozen):
    kind: Literal["error"] = "error"
    reason: str  # an errors.Reason value
    message: str
    task_id: str | None = None


class LLMRequestPayload(Frozen):
    kind: Literal["llm_request"] = "llm_request"
    provider: str
    model: str
    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...] = ()
    max_tokens: int = Field(default=1024, gt=0)
    temperature: float | None = None
    json_output: bool = False  # ask the provider for a JSON object


class LLMResponsePayload(Frozen):
    kind: Literal["llm_response"] = "llm_response"
    request_id: str
    provider: str
    model: str
    message: ChatMessage
    finish_reason: str | None = None
    latency_ms: float = 0.0
    attempts: int = 1


class ToolResultPayload(Frozen):
    kind: Literal["tool_result"] = "tool_result"
    call_id: str
    name: str
    arguments: str = "{}"
    result: str | None = None
    error_reason: str | None = None  # set when the tool could not run
    duration_ms: float = 0.0


class SummaryPayload(Frozen):
    """What the LLM sees in place of an agent's journal up to entry `through`, whose entries
    stay journaled and recorded: a summary the model wrote, or, with `fresh_window`, the
    seed of a fresh window after a context reset (from the latest summary, or the latest
    turns as text). Token counts are the request estimates before and after it."""

    kind: Literal["summary"] = "summary"
    text: str
    through: str  # the id of the last journal entry it stands for
    tokens_before: int = Field(ge=0)
    tokens_after: int = Field(ge=0)
    window: int = Field(gt=0)  # the context window of the model it was made for
    threshold: float = Field(gt=0, lt=1)
    fresh_window: bool = False
    # the summarising LLM call (none for a fresh window's seed): as in LLMResponsePayload
    request_id: str | None = None
    provider: str = ""
    model: str = ""
    finish_reason: str | None = None
    latency_ms: float = 0.0
    attempts: int = 1


class EventPayload(Frozen):
    kind: Literal["event"] = "event"
    name: str  # past tense: breaker_opened, task_dead_lettered, ...
    data: dict[str, Any] = Field(default_factory=dict)


class DeadLetterPayload(Frozen):
    kind: Literal["dead_letter"] = "dead_letter"
    reason: str
    detail: str
    subject: str  # where the message was published
    original: str  # the message as received, truncated to a safe size
    original_bytes: int


Payload = Annotated[
    TaskPayload
    | ReplyPayload
    | ErrorPayload
    | LLMRequestPayload
    | LLMResponsePayload
    | ToolResultPayload
    | SummaryPayload
    | EventPayload
    | DeadLetterPayload,
    Field(discriminator="kind"),
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Envelope(Frozen):
    schema_version: int = SCHEMA_VERSION
    id: str = Field(default_factory=uuid7)
    kind: Kind
    sender: str
    recipient: str
    conversation_id: str
    step: int = Field(default=0, ge=0)
    trace_id: str = Field(default_factory=new_trace_id, pattern=r"^[0-9a-f]{32}$")
    span_id: str = Field(default_factory=new_span_id, pattern=r"^[0-9a-f]{16}$")
    parent_span_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    ts: datetime = Field(default_factory=utcnow)
    payload: Payload
    usage: Usage | None = None

    @model_validator(mode="before")
    @classmethod
    def _kind_from_payload(cls, data: Any) -> Any:
        """`kind` may be omitted: the payload says what it is."""
        if isinstance(data, dict) and "kind" not in data:
            payload = data.get("payload")
            kind = (
                payload.get("kind") if isinstance(payload, dict) else getattr(payload, "kind", None)
            )
            if kind is not None:
                data = {**data, "kind": kind}
        return data

    @model_validator(mode="after")
    def _kind_matches_payload(self) -> Envelope:
        if self.payload.kind != self.kind.value:
            raise ValueError(
                f"kind {self.kind.value!r} does not match payload {self.payload.kind!r}"
            )
        return self

    def child(self, payload: Any, *, sender: str, recipient: str, **fields: Any) -> Envelope:
        """A message caused by this one: same conversation and trace, a new span under ours."""
        base: dict[str, Any] = {
            "sender": sender,
            "recipient": recipient,
            "conversation_id": self.conversation_id,
            "step": self.step,
            "trace_id": self.trace_id,
            "parent_span_id": self.span_id,
            "payload": payload,
        }
        base.update(fields)
        return Envelope(**base)
