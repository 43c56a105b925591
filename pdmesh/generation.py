"""Plain request types both sides of the mesh share: sampling parameters, token outputs, finish reasons.

The engine consumes and produces them; the coordinator builds and reads them. Neither imports the
other's modules for them, and nothing here needs torch or protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, get_args


class RequestMode(StrEnum):
    """What the engine does with a request."""

    MIXED = "mixed"  # prefill and decode in this engine
    PREFILL = "prefill"  # prefill, sample the first token, keep the KV blocks pinned, stop
    DECODE = "decode"  # the prompt's KV is already in ``kv_block_ids``; continue from ``first_token``


class FinishReason(StrEnum):
    """Why a request stopped producing tokens."""

    STOP = "stop"  # end of sequence or a stop token
    LENGTH = "length"  # max_tokens or the model's context reached
    ABORT = "abort"  # cancelled
    ERROR = "error"  # the engine could not serve it (see TokenOutput.error)


# Structured outputs: the kinds of constraint (``StructuredOutput.kind``).
StructuredKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
STRUCTURED_KINDS: tuple[str, ...] = get_args(StructuredKind)


@dataclass
class StructuredOutput:
    """A constraint on the generated text (pdmesh.structured compiles it; the engine enforces it).

    ``spec``: json_schema, the schema as JSON text; regex, the pattern; choice, a JSON list of
    strings; grammar, Lark or GBNF text; json_object, empty. ``resume_tokens``: a continued request
    (a retry, a migration) has a prompt ending in this many tokens already generated under the
    constraint, which the engine's matcher consumes before the first new token.
    """

    kind: StructuredKind
    spec: str = ""
    resume_tokens: int = 0

    def validate(self) -> None:
        """Raises ValueError on an unknown kind (whether ``spec`` compiles is pdmesh.structured's)."""
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}")
        if self.resume_tokens < 0:
            raise ValueError("structured output resume_tokens must be >= 0")


@dataclass
class SamplingParams:
    """Per-request sampling; the defaults are OpenAI's."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # <= 0: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int = 0
    # prompt logprobs: top-N at each prompt position and each prompt token's own (None: none asked)
    prompt_logprobs: int | None = None
    # structured outputs: the constraint on the generated text (None: free text)
    structured: StructuredOutput | None = None

    def validate(self) -> None:
        """Raises ValueError naming the first parameter out of bounds."""
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (0 <= (self.prompt_logprobs or 0) <= 20, "prompt_logprobs must be in [0, 20]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.structured is not None:  # structured outputs
            self.structured.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# Prompt logprobs: one prompt token's (logprob, rank where 1 is the most likely, {top id: logprob}).
PromptLogprob = tuple[float, int, dict[int, float]]


@dataclass
class TokenOutput:
    """What one engine step produced for one request."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    # PREFILL mode, on the finishing output: the pinned blocks holding the prompt's KV. The caller
    # owns them and must hand them back with ``free_kv``.
    kv_block_ids: list[int] | None = None
    # One entry per token in token_ids when logprobs were asked: (chosen logprob, {token: logprob}).
    logprobs: list[tuple[float, dict[int, float]]] | None = None
    # Prompt logprobs, on the output with the first token when asked: one entry per prompt token, the
    # first None (nothing comes before it).
    prompt_logprobs: list[PromptLogprob | None] | None = None
    error: str | None = None
    step_started_ns: int = 0  # time.time_ns() when the step that produced it began (0: unknown)
