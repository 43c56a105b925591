"""The coordinator's Prometheus series (``pdmesh_coordinator_*``) and its recent-latency window.

Latency histograms use vLLM's bucket edges (vllm/v1/metrics), so that dashboards built for vLLM
translate. The series live in prometheus_client's default registry: one coordinator per process.

What is observed where:
- ``observe_stream`` wraps the backend's chunk stream (both fronts): time to first token from the
  request's arrival at the backend (queue time included, as vLLM counts it), inter-token latency per
  token after the first (a chunk of k tokens after a gap g counts g/k k times), end-to-end latency of
  requests that finish. Each also feeds ``RECENT``, the last minute's samples for the live page.
- The fronts count requests by endpoint, status and finish reason, and usage tokens (``Outcome``).
- Admission: queue time, in-flight and queued; the retry loop: retries by cause, migrations, route
  choices.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5)
TTFT_BUCKETS += (10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_BUCKETS += (20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0)
REQUEST_LATENCY_BUCKETS += (60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

_P = "pdmesh_coordinator_"
REQUESTS = Counter(
    _P + "requests_total",
    "Requests answered, by endpoint, status (HTTP status or gRPC code) and finish reason",
    ["endpoint", "status", "finish_reason"],
)
TTFT = Histogram(_P + "time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS)
ITL = Histogram(_P + "inter_token_latency_seconds", "Time between tokens", buckets=ITL_BUCKETS)
E2E = Histogram(_P + "e2e_request_latency_seconds", "Arrival to last token", buckets=REQUEST_LATENCY_BUCKETS)
QUEUE_TIME = Histogram(
    _P + "queue_time_seconds", "Time in the admission queue", buckets=REQUEST_LATENCY_BUCKETS
)
PROMPT_TOKENS = Counter(_P + "prompt_tokens_total", "Prompt tokens of answered requests (usage)")
GENERATION_TOKENS = Counter(_P + "generation_tokens_total", "Completion tokens of answered requests (usage)")
RETRIES = Counter(_P + "retries_total", "Attempts started again on other instances, by cause", ["cause"])
MIGRATIONS = Counter(_P + "migrations_total", "Retries that continued a request already streaming")
INFLIGHT = Gauge(_P + "requests_inflight", "Requests admitted and running")
QUEUED = Gauge(_P + "requests_queued", "Requests waiting in the admission queue")
ROUTE_CHOICES = Counter(
    _P + "route_choices_total", "Instances picked by the router, by role", ["role", "pdmesh_instance"]
)
OVERFLOW_PREFILLS = Counter(
    _P + "overflow_prefills_total",
    "Prompts a decode instance prefilled itself while every prefill instance was busy",
    ["pdmesh_instance"],
)
SCRAPE_FAILURES = Counter(_P + "scrape_failures_total", "Targets /metrics/mesh could not scrape", ["target"])

WINDOW_S = 60.0  # the live page's latency percentiles cover this long


class LatencyWindow:
    """Samples of the last ``WINDOW_S`` seconds by kind (ttft, itl, e2e); thread-safe."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: dict[str, deque[tuple[float, float]]] = {
            "ttft": deque(),
            "itl": deque(),
            "e2e": deque(),
        }
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def add(self, kind: str, value: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            samples = self._samples[kind]
            samples.append((now, value))
            self._prune(samples, now)

    def _prune(self, samples: deque, now: float) -> None:
        while samples and samples[0][0] < now - self.window_s:
            samples.popleft()

    def values(self, kind: str, now: float | None = None) -> list[float]:
        now = time.monotonic() if now is None else now
        with self._lock:
            samples = self._samples[kind]
            self._prune(samples, now)
            return sorted(v for _, v in samples)

    def summary(self, now: float | None = None) -> tuple[dict[str, float | None], float]:
        """The page's percentiles (seconds; None without samples) and finished requests per second."""
        now = time.monotonic() if now is None else now
        latency: dict[str, float | None] = {}
        for kind, quantiles in (("ttft", (50, 90, 99)), ("itl", (50, 99)), ("e2e", (50, 99))):
            values = self.values(kind, now)
            for q in quantiles:
                latency[f"{kind}_p{q}"] = percentile(values, q)
        span = max(1e-3, min(self.window_s, now - self._started))
        return latency, len(self.values("e2e", now)) / span


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank percentile of already sorted values; None for none."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil without floats going astray
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


RECENT = LatencyWindow()


async def observe_stream(chunks: AsyncIterator, started: float) -> AsyncIterator:
    """Passes the backend's chunks through, observing TTFT, ITL and (when it finishes) e2e latency."""
    last = None
    async for chunk in chunks:
        now = time.monotonic()
        count = len(chunk.token_ids)
        if count:
            if last is None:
                _observe(TTFT, "ttft", now - started, now)
                count -= 1  # the first token's gap is the TTFT, not an inter-token latency
                gap = 0.0
            else:
                gap = (now - last) / count
            for _ in range(count):
                _observe(ITL, "itl", gap, now)
            last = now
        if chunk.finished:
            _observe(E2E, "e2e", now - started, now)
        yield chunk


def _observe(histogram: Histogram, kind: str, value: float, now: float) -> None:
    histogram.observe(value)
    RECENT.add(kind, value, now)


@dataclass
class Outcome:
    """How one request ended, set by the front that answered it, counted once by ``record``."""

    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: str | None = None  # overrides the response's status (an error after a stream started)
    finished: bool = False

    def finish(self, finish_reason: str | None, prompt_tokens: int, completion_tokens: int) -> None:
        self.finish_reason = finish_reason or ""
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self.finished = True


def record(endpoint: str, status: str, outcome: Outcome | None) -> None:
    """Counts one answered request and, when it finished, its usage tokens."""
    outcome = outcome or Outcome()
    REQUESTS.labels(endpoint, outcome.status or status, outcome.finish_reason).inc()
    if outcome.finished:
        PROMPT_TOKENS.inc(outcome.prompt_tokens)
        GENERATION_TOKENS.inc(outcome.completion_tokens)
