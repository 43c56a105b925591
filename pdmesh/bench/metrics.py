"""Aggregation of per-request measurements into a serving benchmark's summary metrics.

The definitions follow vLLM's ``bench serve`` so that numbers are comparable across servers:

- TTFT: time from sending the request to the first chunk that carries generated content.
- ITL: the gaps between consecutive content chunks (every gap of every request, pooled).
- TPOT: per request, ``(e2e - ttft) / (output_tokens - 1)``; requests with one output token have none.
- E2EL: time from sending the request to the end of its stream.
- Goodput: completed requests per second that met every given SLO (``ttft``, ``tpot``, ``e2el``, in ms).

Token totals and throughputs count successful requests only. Percentiles of an empty sample are 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

log = logging.getLogger(__name__)

SLO_KEYS = ("ttft", "tpot", "e2el")
LATENCY_NAMES = ("ttft", "tpot", "itl", "e2el")
STAT_NAMES = ("mean", "median", "std", "p90", "p99")


@dataclass
class RequestOutput:
    """What one request measured. Times are seconds; ``start_time`` is relative to the run's start."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    generated_text: str = ""
    status: int | None = None
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, or None with fewer than two output tokens."""
        if not self.success or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def chunk_times(self) -> list[float]:
        """When each content chunk arrived, relative to the run's start."""
        if not self.success:
            return []
        times = [self.start_time + self.ttft]
        for gap in self.itl:
            times.append(times[-1] + gap)
        return times


@dataclass
class BenchMetrics:
    """The summary of a run; field names are the stable keys of the JSON report."""

    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    request_goodput: float | None
    good_completed: int | None
    output_throughput: float
    input_throughput: float
    total_token_throughput: float
    peak_output_throughput: float
    mean_ttft_ms: float = 0.0
    median_ttft_ms: float = 0.0
    std_ttft_ms: float = 0.0
    p90_ttft_ms: float = 0.0
    p99_ttft_ms: float = 0.0
    mean_tpot_ms: float = 0.0
    median_tpot_ms: float = 0.0
    std_tpot_ms: float = 0.0
    p90_tpot_ms: float = 0.0
    p99_tpot_ms: float = 0.0
    mean_itl_ms: float = 0.0
    median_itl_ms: float = 0.0
    std_itl_ms: float = 0.0
    p90_itl_ms: float = 0.0
    p99_itl_ms: float = 0.0
    mean_e2el_ms: float = 0.0
    median_e2el_ms: float = 0.0
    std_e2el_ms: float = 0.0
    p90_e2el_ms: float = 0.0
    p99_e2el_ms: float = 0.0
    errors: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds).

    Raises ValueError on an unknown metric, a missing colon or a non-positive value.
    """
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_KEYS:
            raise ValueError(
                f"invalid goodput SLO {item!r}: expected one of {', '.join(SLO_KEYS)} as NAME:MS"
            )
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(
                f"invalid goodput SLO {item!r}: {value!r} is not a number of milliseconds"
            ) from None
        if not ms > 0 or math.isinf(ms):
            raise ValueError(f"invalid goodput SLO {item!r}: the limit must be a positive number of ms")
        slos[name] = ms
    return slos


def meets_slos(output: RequestOutput, slos: dict[str, float]) -> bool:
    """Whether a successful request met every SLO given (ms); a 1-token request has a TPOT of 0."""
    if not output.success:
        return False
    values = {"ttft": output.ttft, "tpot": output.tpot or 0.0, "e2el": output.latency}
    return all(values[name] * 1000.0 <= limit for name, limit in slos.items())


def latency_stats(values_s: Sequence[float]) -> dict[str, float]:
    """mean/median/std/p90/p99 of latencies given in seconds, returned in milliseconds."""
    if len(values_s) == 0:
        return dict.fromkeys(STAT_NAMES, 0.0)
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {
        "mean": float(np.mean(ms)),
        "median": float(np.median(ms)),
        "std": float(np.std(ms)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
    }


def throughput_timeline(outputs: Sequence[RequestOutput], bin_s: float = 1.0) -> list[float]:
    """Output tokens per second in consecutive ``bin_s`` bins from the run's start.

    Each content chunk of a request counts ``output_tokens / chunks`` tokens, so that the bins add up
    to the reported output tokens even when a chunk carries several tokens.
    """
    if bin_s <= 0:
        raise ValueError("bin_s must be positive")
    counts: dict[int, float] = {}
    for out in outputs:
        times = out.chunk_times()
        if not times or out.output_tokens <= 0:
            continue
        weight = out.output_tokens / len(times)
        for t in times:
            index = max(0, int(t // bin_s))
            counts[index] = counts.get(index, 0.0) + weight
    if not counts:
        return []
    return [counts.get(i, 0.0) / bin_s for i in range(max(counts) + 1)]


def error_list(outputs: Sequence[RequestOutput]) -> list[dict]:
    """``[{"status", "message"}]`` for every failed request, in request order."""
    return [{"status": out.status, "message": out.error} for out in outputs if not out.success]


def compute_metrics(
    outputs: Sequence[RequestOutput], duration_s: float, slos: dict[str, float] | None = None
) -> BenchMetrics:
    """Summarizes a run that lasted ``duration_s`` seconds; goodput is None when no SLO is given."""
    ok = [out for out in outputs if out.success]
    duration = duration_s if duration_s > 0 else float("nan")
    total_in = sum(out.prompt_len for out in ok)
    total_out = sum(out.output_tokens for out in ok)
    good = sum(1 for out in ok if meets_slos(out, slos)) if slos else None
    if not ok and outputs:
        log.warning("all %d requests failed; the latency metrics are 0", len(outputs))

    def rate(count: float) -> float:
        value = count / duration
        return 0.0 if math.isnan(value) else value

    timeline = throughput_timeline(ok)
    metrics = BenchMetrics(
        completed=len(ok),
        failed=len(outputs) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=rate(len(ok)),
        request_goodput=None if good is None else rate(good),
        good_completed=good,
        output_throughput=rate(total_out),
        input_throughput=rate(total_in),
        total_token_throughput=rate(total_in + total_out),
        peak_output_throughput=max(timeline, default=0.0),
        errors=error_list(outputs),
    )
    samples = {
        "ttft": [out.ttft for out in ok],
        "tpot": [t for t in (out.tpot for out in ok) if t is not None],
        "itl": [gap for out in ok for gap in out.itl],
        "e2el": [out.latency for out in ok],
    }
    for name, values in samples.items():
        for stat, value in latency_stats(values).items():
            setattr(metrics, f"{stat}_{name}_ms", value)
    return metrics
