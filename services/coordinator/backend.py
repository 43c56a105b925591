"""The contract between the coordinator's fronts (HTTP, gRPC) and whatever generates tokens.

The fronts tokenize, validate and detokenize; a backend takes prompt ids and streams generated ids.
``MeshBackend`` (mesh.py) is the real one, routing through prefill and decode workers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from pdmesh.engine.types import SamplingParams

# One generated token's logprobs: the chosen token's and {top token id: logprob}, most likely first.
TokenLogprobs = tuple[float, dict[int, float]]


@dataclass
class GenerationChunk:
    """Token ids generated since the previous chunk; the last one has ``finished`` set."""

    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # One entry per token_ids entry when sampling.logprobs > 0, else None.
    logprobs: list[TokenLogprobs] | None = None


class GenerationBackend(Protocol):
    """Generates tokens for one request at a time (many concurrently)."""

    def generate(
        self, request_id: str, prompt_ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        """Streams chunks; raises ``GenerationError``. Closing the iterator early cancels the request."""
        ...

    def ready(self) -> bool:
        """False while fewer than one prefill and one decode instance (or one mixed) are healthy."""
        ...


OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "timeout",
}


class GenerationError(Exception):
    """A request the backend could not serve, with the HTTP status and OpenAI error type to answer."""

    def __init__(
        self,
        message: str,
        status_code: int = 500,
        error_type: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # sent as Retry-After (429, 503)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type or OPENAI_ERROR_TYPES.get(status_code, "internal_server_error")
        self.code = code

    @property
    def http_status(self) -> int:
        return self.status_code
