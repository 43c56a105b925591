"""OpenAI API shapes for the coordinator's HTTP front: requests in, responses and stream chunks out.

Requests accept OpenAI's fields and vLLM's sampling extras (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``); nothing is silently ignored: a field no
model declares is refused with a 400 naming it, one pdmesh knows but does not implement likewise,
with the reason (request_fields.py; docs/api.md lists them). Request fields are validated strictly, as their JSON types
say: ``true`` is not an integer (``3.0`` is, as in JSON Schema), ``"1"`` not a number, and numbers must
be finite (no ``NaN`` or ``Infinity``, which Python's JSON parser would otherwise let through).
The bounds the server enforces on sampling values are declared on the fields (from the table both
fronts share, ``validation.SAMPLING_BOUNDS``), so that the OpenAPI schema documents them. Responses
are serialized with every OpenAI field present (``null`` where there is no value), as OpenAI does.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_serializer, model_validator

from pdmesh.generation import SamplingParams
from services.coordinator import request_fields
from services.coordinator.structured_api import ResponseFormat, StructuredOutputsParams
from services.coordinator.tools_api import DeltaToolCall, ToolCall, ToolChoice, ToolDefinition
from services.coordinator.validation import bounded

# How request bodies are read: JSON types as declared, finite numbers only.
STRICT = ConfigDict(strict=True, allow_inf_nan=False)


def _integral(value: Any) -> Any:
    """JSON Schema's integers include ``3.0``; a client's serializer may write one."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer, given as 3 or 3.0 (not true, not "3"). Bounds go before it in Annotated[...], where the
# JSON schema shows them as minimum/maximum.
INTEGRAL = BeforeValidator(_integral)
Int = Annotated[int, INTEGRAL]

# Declared here, the bounds are checked first and documented in the OpenAPI schema.
TokenId = Annotated[
    int, Field(ge=0), INTEGRAL
]  # below the vocabulary size too (checked against the tokenizer)
Budget = Annotated[int, Field(ge=1), INTEGRAL]
TopLogprobs = Annotated[int, bounded("logprobs"), INTEGRAL]
NonEmptyText = Annotated[str, Field(min_length=1)]
NonEmptyIds = Annotated[list[TokenId], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", **STRICT)

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    # Never silently ignore (request_fields.py): undeclared fields are refused by name.
    model_config = ConfigDict(extra="forbid", **STRICT)

    model: str | None = None
    max_tokens: Budget | None = None
    temperature: Annotated[float, bounded("temperature")] | None = None
    top_p: Annotated[float, bounded("top_p")] | None = None
    n: Annotated[int, Field(ge=1), INTEGRAL] | None = 1  # n > 1: fanout.py
    stop: str | list[str] | None = None
    seed: Annotated[int, bounded("seed"), INTEGRAL] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, bounded("presence_penalty")] | None = None
    frequency_penalty: Annotated[float, bounded("frequency_penalty")] | None = None
    # vLLM extras
    top_k: Annotated[int, bounded("top_k"), INTEGRAL] | None = None
    min_p: Annotated[float, bounded("min_p")] | None = None
    repetition_penalty: Annotated[float, bounded("repetition_penalty")] | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[TokenId] | None = None
    # structured outputs (structured_outputs.py): OpenAI's response_format, vLLM's guided_* and structured_outputs
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # Accepted and unused: who the end user is, a cache-routing hint (the prefix cache needs none).
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _screen_fields(cls, data: Any) -> Any:
        return request_fields.screen(cls, data, request_fields.REFUSED)

    # prompt logprobs (vLLM's extra; echo.py): top-N at each prompt position, with each prompt token's
    prompt_logprobs: Annotated[int, bounded("prompt_logprobs"), INTEGRAL] | None = None

    def prompt_logprobs_count(self) -> int | None:
        return self.prompt_logprobs

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_top(self) -> int | None:
        """How many top tokens to answer per token; None when logprobs were not asked."""
        return None

    def logprobs_count(self) -> int:
        """The engine's ``logprobs``: at least 1 when asked, so that the chosen tokens' come back."""
        top = self.logprobs_top()
        return 0 if top is None else max(top, 1)

    def to_sampling(self, max_tokens: int) -> SamplingParams:
        """SamplingParams with OpenAI's defaults for unset fields (not yet validated)."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            max_tokens=max_tokens,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos),
            logprobs=self.logprobs_count(),
            prompt_logprobs=self.prompt_logprobs_count(),
        )


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: a prompt as text or token ids, or a list of them (http_fanout.py)."""

    prompt: (
        NonEmptyText
        | NonEmptyIds
        | Annotated[list[NonEmptyText], Field(min_length=1)]
        | Annotated[list[NonEmptyIds], Field(min_length=1)]
    )
    logprobs: TopLogprobs | None = None
    echo: bool | None = False
    best_of: Annotated[int, Field(ge=1), INTEGRAL] | None = None  # fanout.py

    def logprobs_top(self) -> int | None:
        return self.logprobs

    # echo (echo.py): max_tokens 0 with echo returns only the prompt (one token is generated, dropped)
    max_tokens: Annotated[int, Field(ge=0), INTEGRAL] | None = None

    def requested_max_tokens(self) -> int | None:
        return 1 if self.echo and self.max_tokens == 0 else self.max_tokens

    def prompt_logprobs_count(self) -> int | None:
        # as vLLM: echo with logprobs asks for the prompt's too
        return self.logprobs if self.prompt_logprobs is None and self.echo else self.prompt_logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", **STRICT)

    type: Literal["text"]  # the only kind of part a text model takes
    text: str | None = None


class ChatMessage(BaseModel):
    """One message; extra keys (``tool_calls``, ``reasoning_content``...) reach the chat template."""

    model_config = ConfigDict(extra="allow", **STRICT)

    role: Literal[request_fields.ROLES]  # others: 400
    content: str | list[TextPart] | None = None
    name: str | None = None
    # tools (tools.py): an assistant's calls, and the call a tool message answers
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Budget | None = None
    logprobs: bool | None = False
    top_logprobs: TopLogprobs | None = None
    # best_of (vLLM's extra in chat): fanout.py
    best_of: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    # tools: functions the model may call (tools.py)
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_top(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# -- responses --------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "pdmesh"
    max_model_len: int | None = None  # vLLM's extra field: prompt + completion tokens the model takes


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: Any = None
    finish_reason: str | None = None
    prompt_logprobs: Any = None  # vLLM's extra (echo.py); not in stream chunks


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)  # tools (tools.py), [] as vLLM's


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: Any = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None = None
    usage: Usage
    prompt_logprobs: Any = None  # vLLM's extra (echo.py)


class Delta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None  # tools (tool_parser.py)

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: Any = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None

    @model_serializer(mode="wrap")
    def _without_prompt_logprobs(self, handler) -> dict:
        data = handler(self)  # as vLLM: prompt logprobs are answered whole, never streamed
        for choice in data.get("choices", ()):
            choice.pop("prompt_logprobs", None)
        return data


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error object, as every 4xx/5xx answer carries it (documents the OpenAPI schema)."""

    error: ErrorDetail


class HealthStatus(BaseModel):
    status: Literal["ok", "unavailable"]


class ReadyStatus(BaseModel):
    status: Literal["ready", "not ready"]
    missing: str | None = None  # what the coordinator still waits for


def error_body(
    message: str,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
