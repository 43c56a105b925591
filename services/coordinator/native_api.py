"""Request and response shapes of the native endpoints the MindIE-MS coordinator serves besides OpenAI's:
MindIE's ``/infer`` and TGI's ``/generate`` and ``/generate_stream`` (native_routes.py serves them).

Both take ``{"inputs": text, "parameters": {...}}``; ``/infer`` says ``"stream": true`` to stream,
TGI streams on ``/generate_stream`` (or on ``/generate`` with ``"stream": true``, as TGI's clients
send it to the compatibility route). The parameters are TGI's (MindIE takes the same names), plus
``ignore_eos``, which AISBench's MindIE client sends. Parameters named by TGI or MindIE that pdmesh
does not implement are refused by name unless they ask for nothing (request_fields.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.coordinator import openai_api as api
from services.coordinator import request_fields
from services.coordinator.validation import INT32_MAX, INT64_MAX, bounded

_STRICT = ConfigDict(extra="forbid", **api.STRICT)
_ONE_TIER = "pdmesh serves every request alike"

# TGI's and MindIE's parameters pdmesh does not implement: name -> (values asking nothing, why).
NATIVE_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "decoder_input_details": (
        (False,),
        "prompt tokens are not returned here (use /v1/completions with echo)",
    ),
    "best_of": ((1,), "one sequence per request here (use n or best_of on /v1/completions)"),
    "top_n_tokens": ((0,), "top tokens are not returned here (use logprobs on /v1/completions)"),
    "typical_p": ((1, 1.0), "typical sampling is not implemented"),
    "watermark": ((False,), "watermarking is not implemented"),
    "adapter_id": (("None",), "LoRA adapters are not implemented"),
    "priority": ((5,), _ONE_TIER),  # MindIE's default (lowest) priority
    "timeout": ((), "requests have no per-request timeout"),
}


class TGIGrammar(BaseModel):
    """TGI's ``grammar``: a JSON schema (``json``, as an object or JSON text) or a ``regex``."""

    model_config = _STRICT

    type: Literal["json", "json_object", "regex"]
    value: dict[str, Any] | str


class NativeParameters(BaseModel):
    """``parameters``: generation settings. Sampling happens when ``do_sample`` is true or when
    ``temperature``, ``top_k`` or ``top_p`` changes the distribution (TGI's rule); else greedy."""

    model_config = _STRICT

    max_new_tokens: Annotated[int, Field(ge=1), api.INTEGRAL] | None = None  # default 20
    do_sample: bool | None = None
    temperature: Annotated[float, Field(gt=0)] | None = None
    top_k: Annotated[int, Field(gt=0, le=INT32_MAX), api.INTEGRAL] | None = None
    top_p: Annotated[float, bounded("top_p")] | None = None
    repetition_penalty: Annotated[float, bounded("repetition_penalty")] | None = None
    frequency_penalty: Annotated[float, bounded("frequency_penalty")] | None = None
    seed: Annotated[int, Field(ge=0, le=INT64_MAX), api.INTEGRAL] | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    details: bool | None = False
    return_full_text: bool | None = False
    truncate: Annotated[int, Field(ge=1), api.INTEGRAL] | None = None  # keep the last N prompt tokens
    grammar: TGIGrammar | None = None  # enforced as the OpenAI routes' structured outputs are

    @model_validator(mode="before")
    @classmethod
    def _screen_fields(cls, data: Any) -> Any:
        return request_fields.screen(cls, data, NATIVE_REFUSED)

    def samples(self) -> bool:
        if self.do_sample:
            return True
        warped = self.temperature not in (None, 1.0) or self.top_k is not None
        return warped or (self.top_p is not None and self.top_p < 1.0)


class NativeRequest(BaseModel):
    """What both APIs send: the prompt text and its parameters."""

    model_config = _STRICT

    inputs: api.NonEmptyText
    parameters: NativeParameters = Field(default_factory=NativeParameters)


class InferRequest(NativeRequest):
    """MindIE's ``POST /infer``."""

    stream: bool = False


class TGIRequest(NativeRequest):
    """TGI's ``POST /generate`` and ``/generate_stream``."""

    stream: bool | None = None
    add_special_tokens: bool = True


# -- responses --------------------------------------------------------------------------------------


class TGIToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool


class TGIDetails(BaseModel):
    """``finish_reason``: ``length``, ``eos_token`` (an end-of-sequence or stop token) or
    ``stop_sequence`` (a stop string)."""

    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    prefill: list[TGIToken] = Field(default_factory=list)
    tokens: list[TGIToken]


class TGIResponse(BaseModel):
    generated_text: str
    details: TGIDetails | None = None  # only when parameters.details is true


class TGIStreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    input_length: int


class TGIStreamEvent(BaseModel):
    """One generated token; the last event also has ``generated_text`` (and ``details`` when asked)."""

    index: int
    token: TGIToken
    top_tokens: list[TGIToken] | None = None
    generated_text: str | None = None
    details: TGIStreamDetails | None = None


class InferDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None = None


class InferResponse(BaseModel):
    generated_text: str
    details: InferDetails | None = None  # only when parameters.details is true


class InferTokens(BaseModel):
    id: list[int]
    text: str


class InferStreamEvent(BaseModel):
    """The tokens one step produced; the last event also has ``generated_text`` (and ``details``)."""

    prefill_time: float | None = None  # ms to the first token (first event)
    decode_time: float | None = None  # ms since the previous event (later events)
    token: InferTokens
    generated_text: str | None = None
    details: InferDetails | None = None


REQUESTS = (InferRequest, TGIRequest)
