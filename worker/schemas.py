"""The worker's HTTP contract: request bodies, event names and document shapes.

rbee_hive and rbee_keeper import this module (never the server) to speak to a worker.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rbee_common.names import HealthStatus, JobEvent, StopReason
from worker.protocol import ERROR_LINE_PREFIX, HEALTH_SCHEMA, MAX_BODY_BYTES, TOKEN_ENV

__all__ = ["ERROR_LINE_PREFIX", "HEALTH_SCHEMA", "MAX_BODY_BYTES", "TOKEN_ENV", "HealthStatus",
           "JobEvent", "StopReason"]
JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"


StopString = Annotated[str, Field(min_length=1, max_length=256)]


class ExecuteRequest(BaseModel):
    """POST /execute."""

    model_config = ConfigDict(extra="forbid")

    job_id: str | None = Field(default=None, pattern=JOB_ID_PATTERN)
    prompt: str | None = Field(default=None, min_length=1)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)  # formatted with the
    # model's own chat template, as /v1/chat/completions does
    max_tokens: int = Field(default=128, ge=1, le=1_000_000)
    temperature: float = Field(default=0.7, ge=0.0, le=5.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0, le=100_000)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: list[StopString] = Field(default_factory=list, max_length=16)

    def input_error(self) -> str | None:
        """Why the body's input is unusable: it needs a prompt or messages, not both."""
        if (self.prompt is None) == (self.messages is None):
            return "give a prompt or messages (one of them)"
        return None


class CancelRequest(BaseModel):
    """POST /cancel."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(pattern=JOB_ID_PATTERN)


class CompletionRequest(BaseModel):
    """POST /v1/completions (the fields rbee honours; others are accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: str | list[StopString] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: str | list[StopString] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


ExecuteRequest.model_rebuild()
