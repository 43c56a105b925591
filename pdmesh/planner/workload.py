"""What the simulator is asked about: length distributions, the workload, the SLOs and engine limits.

``Requests`` is one sampled request set: unit-rate exponential arrival gaps (one stream for prefill,
one for decode) and lengths, drawn once per workload from its seed. Scaling the gaps by a rate gives
Poisson arrivals at that rate, so simulations at different rates share their random numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: ``fixed`` (one value), ``uniform`` (lo, hi inclusive) or ``empirical``."""

    kind: str
    values: tuple[int, ...]

    @staticmethod
    def parse(spec: str) -> LengthDist:
        """``128``, ``fixed:128``, ``uniform:32,512``, ``empirical:10,20,30`` or ``@file``.

        ``@file`` holds a JSON list, ``{"lengths": [...]}``, or numbers separated by spaces or commas.
        """
        spec = spec.strip()
        try:
            if spec.startswith("@"):
                return LengthDist("empirical", _read_lengths(Path(spec[1:])))
            kind, _, rest = spec.partition(":") if ":" in spec else ("fixed", "", spec)
            values = tuple(int(v) for v in rest.replace(" ", "").split(",") if v)
        except (ValueError, OSError) as exc:
            raise ValueError(f"bad length spec {spec!r}: {exc}") from None
        dist = LengthDist(kind, values)
        dist.validate(spec)
        return dist

    def validate(self, spec: str = "") -> None:
        counts = {"fixed": 1, "uniform": 2}
        if self.kind not in ("fixed", "uniform", "empirical"):
            raise ValueError(f"bad length spec {spec!r}: kind must be fixed, uniform or empirical")
        if self.kind in counts and len(self.values) != counts[self.kind]:
            raise ValueError(f"bad length spec {spec!r}: {self.kind} takes {counts[self.kind]} value(s)")
        if not self.values or min(self.values) < 1:
            raise ValueError(f"bad length spec {spec!r}: lengths must be >= 1")
        if self.kind == "uniform" and self.values[0] > self.values[1]:
            raise ValueError(f"bad length spec {spec!r}: uniform needs lo <= hi")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, self.values[0], dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.values[0], self.values[1] + 1, size=n, dtype=np.int64)
        return rng.choice(np.asarray(self.values, dtype=np.int64), size=n, replace=True)

    def mean(self) -> float:
        if self.kind == "uniform":
            return (self.values[0] + self.values[1]) / 2
        return float(np.mean(self.values))

    def __str__(self) -> str:
        if self.kind == "empirical" and len(self.values) > 4:
            return f"empirical(n={len(self.values)}, mean={self.mean():.0f})"
        return f"{self.kind}:{','.join(map(str, self.values))}"


def _read_lengths(path: Path) -> tuple[int, ...]:
    text = path.read_text()
    try:
        data = json.loads(text)
        values = data if isinstance(data, list) else data["lengths"]
    except (json.JSONDecodeError, KeyError, TypeError):
        values = text.replace(",", " ").split()
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class Workload:
    """Poisson arrivals at ``rate`` req/s with sampled input and output lengths."""

    rate: float
    input_len: LengthDist
    output_len: LengthDist
    num_requests: int = 2000
    seed: int = 0


@dataclass(frozen=True)
class SLO:
    ttft_ms: float
    tpot_ms: float
    attainment: float = 0.9


@dataclass(frozen=True)
class Limits:
    """Engine limits and the KV transfer cost between a prefill and a decode instance."""

    max_prefill_tokens: int = 8192
    max_prefill_batch_size: int = 64
    max_decode_batch_size: int = 256
    kv_transfer_s_per_token: float = 0.0


@dataclass(frozen=True)
class Requests:
    """One sampled request set: unit-rate arrival gaps (two streams) and lengths."""

    gaps_prefill: np.ndarray
    gaps_decode: np.ndarray
    input_len: np.ndarray
    output_len: np.ndarray

    @staticmethod
    def sample(workload: Workload) -> Requests:
        rng = np.random.default_rng(workload.seed)
        n = workload.num_requests
        return Requests(
            gaps_prefill=rng.exponential(1.0, n),
            gaps_decode=rng.exponential(1.0, n),
            input_len=workload.input_len.sample(rng, n),
            output_len=workload.output_len.sample(rng, n),
        )

    def arrivals(self, rate: float, stream: str = "prefill") -> np.ndarray:
        gaps = self.gaps_prefill if stream == "prefill" else self.gaps_decode
        return np.cumsum(gaps) / rate
