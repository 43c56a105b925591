"""The contract between the coordinator's fronts (HTTP, gRPC) and whatever generates tokens.

The fronts tokenize, validate and detokenize; a backend takes prompt ids and streams generated ids.
``MeshBackend`` (mesh.py) is the real one, routing through prefill and decode workers. A backend
fails with a kind (``pdmesh.errors.ErrorKind``); each front maps it to its own status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from pdmesh.errors import ErrorKind
from pdmesh.generation import PromptLogprob, SamplingParams

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
    # Prompt logprobs, on the first chunk when sampling.prompt_logprobs is set: one entry per prompt
    # token, (logprob, rank, {top id: logprob}), the first None.
    prompt_logprobs: list[PromptLogprob | None] | None = None


# n > 1 and best_of (fanout.py): the samples of one prompt share its KV through the prefix cache.
@dataclass
class Affinity:
    """Where a group of requests sharing one prompt had it prefilled: an instance id per role
    (``Role.value``). The backend records the instance that computed the prompt's KV and sends the
    group's later requests there, whose prefill then finds the prompt's blocks in its prefix cache."""

    instances: dict[str, str] = field(default_factory=dict)


class GenerationBackend(Protocol):
    """Generates tokens for one request at a time (many concurrently)."""

    def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        affinity: Affinity | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Streams chunks; raises ``GenerationError``. Closing the iterator early cancels the request.
        ``affinity``: the group of requests sharing this prompt, if any (where to prefill it)."""
        ...

    def ready(self) -> bool:
        """False while fewer than one prefill and one decode instance (or one mixed) are healthy."""
        ...


class GenerationError(Exception):
    """A request the backend could not serve, and what went wrong (``kind``)."""

    def __init__(
        self, message: str, kind: ErrorKind = ErrorKind.INTERNAL, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.retry_after_s = retry_after_s  # when to try again (OVERLOADED, UNAVAILABLE), if known
