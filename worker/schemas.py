"""The worker's HTTP contract: request bodies, event names and document shapes.

rbee_hive and rbee_keeper import this module (never the server) to speak to a worker.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from rbee_common.names import HealthStatus, JobEvent, StopReason
from worker.protocol import ERROR_LINE_PREFIX, HEALTH_SCHEMA, MAX_BODY_BYTES, TOKEN_ENV

__all__ = ["ERROR_LINE_PREFIX", "HEALTH_SCHEMA", "MAX_BODY_BYTES", "TOKEN_ENV", "HealthStatus",
           "JobEvent", "StopReason"]
JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"


StopString = Annotated[str, Field(min_length=1, max_length=256)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
UNSUPPORTED = "unsupported_parameter"  # the pydantic error type (and OpenAI code) of a
# parameter the worker cannot honour: a 400 naming it, never dropped in silence
MAX_LOGIT_BIAS = 1024
MAX_SCHEMA_BOUNDS = 10_000  # the sum of a JSON schema's length and item bounds: the grammar
# llama-cpp-python builds from it grows with them (maxLength 10⁹ would be gigabytes)


def _refuse(field: str, why: str) -> PydanticCustomError:
    return PydanticCustomError(UNSUPPORTED, "cannot be honoured: {why}",
                               {"field": field, "why": why})


def _check_logit_bias(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("a map of token ids to biases between -100 and 100")
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens")
    for key, bias in value.items():
        if not str(key).isdigit() or len(str(key)) > 9:
            raise ValueError(f"{key!r} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise ValueError(f"the bias of token {key} must be a number between -100 and 100")
    return value


def _schema_bounds(schema: Any) -> int:
    """The sum of the length and item bounds anywhere in a JSON schema."""
    total, stack = 0, [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("minLength", "maxLength", "minItems", "maxItems", "minProperties",
                           "maxProperties") and isinstance(value, int):
                    total += abs(value)
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return total


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, json_object (any JSON object), or json_schema; the
    worker holds the output to it with a llama.cpp grammar."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama-cpp-python's
    # json_object with a schema

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and not (
                isinstance(self.json_schema, dict) and isinstance(self.json_schema.get("schema"),
                                                                  dict)):
            raise ValueError("json_schema needs {\"name\": ..., \"schema\": {...}}")
        schema = self.json_schema_doc()
        if schema is not None and _schema_bounds(schema) > MAX_SCHEMA_BOUNDS:
            raise ValueError(f"the schema's length and item bounds add up to more than "
                             f"{MAX_SCHEMA_BOUNDS}")
        return self

    def json_schema_doc(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow; None for any JSON object or plain text."""
        if self.type == "json_schema" and self.json_schema is not None:
            return dict(self.json_schema["schema"])
        return self.schema_ if self.type == "json_object" else None


class Sampling(BaseModel):
    """Sampling parameters beyond temperature/top_p/top_k that llama.cpp honours, shared by
    /execute and the OpenAI routes."""

    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)  # llama.cpp's own; 1 is off
    logit_bias: dict[str, float] | None = None  # token id (as a string, as JSON keys are)
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, value: Any) -> Any:
        return _check_logit_bias(value)


class ExecuteRequest(Sampling):
    """POST /execute."""

    model_config = ConfigDict(extra="forbid")

    job_id: str | None = Field(default=None, pattern=JOB_ID_PATTERN)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)  # formatted with the
    # model's own chat template, as /v1/chat/completions does
    prompt: str | None = Field(default=None, min_length=1, validate_default=True)
    max_tokens: int = Field(default=128, ge=1, le=1_000_000)
    temperature: float = Field(default=0.7, ge=0.0, le=5.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0, le=100_000)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: list[StopString] = Field(default_factory=list, max_length=16)

    @field_validator("prompt")
    @classmethod
    def _one_input(cls, value: str | None, info: ValidationInfo) -> str | None:
        # a field validator (after messages), so the 400 names the field
        if "messages" in info.data and (value is None) == (info.data["messages"] is None):
            raise ValueError("give a prompt or messages (one of them)")
        return value


class CancelRequest(BaseModel):
    """POST /cancel."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(pattern=JOB_ID_PATTERN)


# OpenAI parameters that change nothing in an answer from one local model: accepted as given
_NO_EFFECT = ("user", "metadata", "store", "service_tier", "stream_options",
              "parallel_tool_calls", "prompt_cache_key", "safety_identifier")
# OpenAI parameters the worker cannot honour, each with the value(s) that ask for nothing
_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((None, []), "the worker does not call tools"),
    "functions": ((None, []), "the worker does not call functions"),
    "tool_choice": ((None, "none", "auto"), "the worker does not call tools"),
    "function_call": ((None, "none", "auto"), "the worker does not call functions"),
    "n": ((None, 1), "the worker answers with one choice"),
    "best_of": ((None, 1), "the worker answers with one choice"),
    "suffix": ((None, ""), "the worker does not fill in the middle"),
    "audio": ((None,), "the worker's model reads and writes text only"),
    "modalities": ((None, ["text"]), "the worker's model reads and writes text only"),
    "prediction": ((None,), "the worker does not use predicted outputs"),
    "web_search_options": ((None,), "the worker does not search the web"),
    "reasoning_effort": ((None,), "the worker's model has no reasoning effort setting"),
    "verbosity": ((None,), "the worker's model has no verbosity setting"),
}


class OpenAIRequest(Sampling):
    """What /v1/completions and /v1/chat/completions share. Unknown fields are a 400 naming
    them, as OpenAI answers; fields the worker cannot honour are a 400 saying why."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0, le=100_000)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: list[StopString] | None = Field(default=None, max_length=16)  # or one string
    stream: bool = False

    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    stream_options: Any = None
    parallel_tool_calls: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None

    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    n: Any = None
    best_of: Any = None
    suffix: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator(*_REFUSED, mode="before")
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        name = str(info.field_name)
        neutral, why = _REFUSED[name]
        if value not in neutral:
            raise _refuse(name, why)
        return value


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions."""

    prompt: str
    max_tokens: int | None = Field(default=16, ge=1, le=1_000_000)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)  # OpenAI allows up to 5

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            if len(value) > 1:
                raise _refuse("prompt", f"a batch of {len(value)} prompts; the worker answers "
                              "one prompt per request")
            return value[0]  # a batch of one
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs_without_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("echo"):
            raise _refuse("logprobs", "with echo it needs the prompt's logprobs, which the "
                          "worker does not compute")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                if not isinstance(part, dict):
                    raise ValueError("content parts are objects with a type")
                kind = part.get("type")
                if kind != "text":
                    raise _refuse("content", f"a {kind!r} part; the worker's model reads "
                                  "text only")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text part needs its text as a string")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p["text"] for p in self.content)
        return self.content or ""


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value


def stop_list(stop: str | list[str] | None) -> list[str]:
    """A request's stop strings as a list."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


ExecuteRequest.model_rebuild()
