"""Request checks both fronts share, so that HTTP and gRPC refuse the same values with the same words.

Sampling values have one table of bounds (``SAMPLING_BOUNDS``): the HTTP front declares them on its
request fields (``bounded``), where pydantic checks them and the OpenAPI schema shows them, and words
a failure with ``bound_message``; the gRPC front checks a request's values against the same table
(``check_sampling``). Token ids are checked against the vocabulary by ``check_token_ids``.

The bounds are the ones the server enforces anyway (``SamplingParams.validate``, the workers'
protocol): ``seed`` is a signed 64-bit integer and ``top_k`` -1 (disabled) or more, within 32 bits,
as the workers' protocol carries them; ``top_p`` and ``repetition_penalty`` at least the smallest
positive float32 (the protocol's type: a smaller positive value would reach the workers as 0).
"""

from __future__ import annotations

import math

from pydantic import Field

from pdmesh.generation import SamplingParams

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TOP_LOGPROBS_MAX = 20  # the engine's bound (SamplingParams.validate)
FLOAT32_TINY = 2.0**-149

# name: (minimum, maximum), None where unbounded; in the order the fields are checked.
SAMPLING_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "temperature": (0, None),
    "top_p": (FLOAT32_TINY, 1),
    "seed": (INT64_MIN, INT64_MAX),
    "presence_penalty": (-2, 2),
    "frequency_penalty": (-2, 2),
    "top_k": (-1, INT32_MAX),
    "min_p": (0, 1),
    "repetition_penalty": (FLOAT32_TINY, None),
    "logprobs": (0, TOP_LOGPROBS_MAX),
    "prompt_logprobs": (0, TOP_LOGPROBS_MAX),
}


def bounded(name: str):
    """The pydantic ``Field`` declaring ``name``'s bounds (for ``Annotated[...]``)."""
    low, high = SAMPLING_BOUNDS[name]
    return Field(ge=low, le=high)


def bound_message(name: str, op: str, limit: float) -> str:
    """``temperature must be >= 0``: how both fronts word a value out of bounds."""
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)
    return f"{name} must be {op} {limit}"


def check_sampling(sampling: SamplingParams) -> None:
    """Raises ValueError naming the first value out of ``SAMPLING_BOUNDS``."""
    for name, (low, high) in SAMPLING_BOUNDS.items():
        value = getattr(sampling, name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}: Input should be a finite number")
        if low is not None and value < low:
            raise ValueError(bound_message(name, ">=", low))
        if high is not None and value > high:
            raise ValueError(bound_message(name, "<=", high))


def check_token_ids(ids, vocab_size: int, name: str) -> None:
    """Raises ValueError when an id of ``ids`` is outside the vocabulary."""
    if any(not 0 <= t < vocab_size for t in ids):
        raise ValueError(f"{name} must be in [0, {vocab_size})")
