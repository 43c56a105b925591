"""A worker's Prometheus series (``pdmesh_worker_*``), each labelled ``{pdmesh_instance, role}``.

The metric objects live in prometheus_client's default registry, so the worker's metrics server
serves them; each ``WorkerMetrics`` binds them to one worker's instance id and its current role (read
at every update, so that series follow a role flip: counters start new series under the new role,
gauges show the role the worker has now). Several workers in one process (tests) keep apart by
their instance ids.

Load gauges are read from the engine's stats snapshot when Prometheus scrapes (a custom collector:
never stale, no timer); counters and histograms move where the event happens. Names and meanings:
``docs/observability.md``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pdmesh.engine.types import EngineStats

LABELS = ("pdmesh_instance", "role")

# Engine steps take from a fraction of a millisecond (a decode step of a tiny model) to seconds (a
# long prefill on a CPU); vLLM's iteration-latency edges extended downwards.
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

PREFIX_QUERIES = Counter(
    "pdmesh_worker_prefix_cache_queries_tokens",
    "Prompt tokens looked up in the prefix cache",
    LABELS,
)
PREFIX_HITS = Counter(
    "pdmesh_worker_prefix_cache_hits_tokens",
    "Prompt tokens found in the prefix cache (their KV reused, not computed)",
    LABELS,
)
STEP_DURATION = Histogram(
    "pdmesh_worker_step_duration_seconds",
    "Wall time of one engine step, by the phase of its batch",
    (*LABELS, "phase"),
    buckets=STEP_BUCKETS,
)
BATCH_SIZE = Histogram(
    "pdmesh_worker_batch_size",
    "Sequences in one engine step's batch, by phase",
    (*LABELS, "phase"),
    buckets=BATCH_BUCKETS,
)
TRANSFER_BYTES = Counter(
    "pdmesh_worker_kv_transfer_bytes",
    "KV cache bytes moved between instances (send: served by this prefill worker; receive: pulled)",
    (*LABELS, "backend", "direction"),
)
TRANSFER_DURATION = Histogram(
    "pdmesh_worker_kv_transfer_duration_seconds",
    "Wall time of one KV pull (every rank of the instance), measured by the pulling worker",
    (*LABELS, "backend"),
    buckets=TRANSFER_BUCKETS,
)
TRANSFER_FAILURES = Counter(
    "pdmesh_worker_kv_transfer_failures",
    "KV pulls that failed, by cause (timeout, refused, error)",
    (*LABELS, "backend", "cause"),
)
HANDLES = Counter(
    "pdmesh_worker_kv_handles",
    "KV handle events: registered and released/expired on the prefill worker, claimed on the decode worker",
    (*LABELS, "event"),
)
COLLECTIVE_DURATION = Histogram(
    "pdmesh_worker_collective_duration_seconds",
    "Seconds the leader rank of a parallel instance spent in collectives during one step",
    LABELS,
    buckets=STEP_BUCKETS,
)


class WorkerMetrics:
    """One worker's view of the series: ``role`` is read whenever a value moves."""

    def __init__(self, instance_id: str, role: Callable[[], str], backend: str) -> None:
        self.instance_id = instance_id
        self.role = role
        self.backend = backend
        self._lock = threading.Lock()  # the prefix-cache deltas: engine thread and role flips
        self._seen_queries = 0
        self._seen_hits = 0

    def _labels(self) -> tuple[str, str]:
        return self.instance_id, self.role()

    def engine_step(self, batches: list[tuple[bool, int]], seconds: float, stats: EngineStats) -> None:
        """After each engine step (engine thread): its batches as (is_prefill, size) and the stats."""
        labels = self._labels()
        for is_prefill, size in batches:
            phase = "prefill" if is_prefill else "decode"
            STEP_DURATION.labels(*labels, phase).observe(seconds)
            BATCH_SIZE.labels(*labels, phase).observe(size)
        with self._lock:  # the engine's counters are cumulative: add what is new since the last step
            queries = stats.prefix_cache_query_tokens - self._seen_queries
            hits = stats.prefix_cache_hit_tokens - self._seen_hits
            self._seen_queries += queries
            self._seen_hits += hits
        if queries > 0:
            PREFIX_QUERIES.labels(*labels).inc(queries)
        if hits > 0:
            PREFIX_HITS.labels(*labels).inc(hits)

    def kv_sent(self, nbytes: int) -> None:
        """A pull this worker's transfer server served to the end (any transfer thread)."""
        TRANSFER_BYTES.labels(*self._labels(), self.backend, "send").inc(nbytes)

    def kv_received(self, nbytes: int, seconds: float) -> None:
        labels = self._labels()
        TRANSFER_BYTES.labels(*labels, self.backend, "receive").inc(nbytes)
        TRANSFER_DURATION.labels(*labels, self.backend).observe(seconds)

    def kv_failed(self, cause: str) -> None:
        TRANSFER_FAILURES.labels(*self._labels(), self.backend, cause).inc()

    def handle(self, event: str, count: int = 1) -> None:
        """``registered``, ``claimed``, ``released`` or ``expired``."""
        if count > 0:
            HANDLES.labels(*self._labels(), event).inc(count)

    def collective(self, seconds: float) -> None:
        COLLECTIVE_DURATION.labels(*self._labels()).observe(seconds)


class WorkerLoadCollector(Collector):
    """The load gauges of every live worker in this process, read from its engine's last snapshot."""

    def __init__(self) -> None:
        self._sources: weakref.WeakKeyDictionary[WorkerMetrics, Callable[[], EngineStats]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def add(self, metrics: WorkerMetrics, stats: Callable[[], EngineStats]) -> None:
        with self._lock:
            self._sources[metrics] = stats

    def remove(self, metrics: WorkerMetrics) -> None:
        with self._lock:
            self._sources.pop(metrics, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            "running": GaugeMetricFamily(
                "pdmesh_worker_requests_running", "Requests in the engine's running batch", labels=LABELS
            ),
            "waiting": GaugeMetricFamily(
                "pdmesh_worker_requests_waiting", "Requests queued for the engine", labels=LABELS
            ),
            "used": GaugeMetricFamily(
                "pdmesh_worker_kv_blocks_used",
                "KV cache blocks in use (pinned handles included)",
                labels=LABELS,
            ),
            "free": GaugeMetricFamily("pdmesh_worker_kv_blocks_free", "KV cache blocks free", labels=LABELS),
        }
        with self._lock:
            sources = list(self._sources.items())
        for metrics, stats_of in sources:
            s = stats_of()
            labels = [metrics.instance_id, metrics.role()]
            families["running"].add_metric(labels, s.running)
            families["waiting"].add_metric(labels, s.waiting)
            families["used"].add_metric(labels, s.total_blocks - s.free_blocks)
            families["free"].add_metric(labels, s.free_blocks)
        yield from families.values()

    def describe(self) -> list:
        return []  # names are dynamic per worker; describing none keeps registration cheap


LOAD = WorkerLoadCollector()
REGISTRY.register(LOAD)


def transfer_failure_cause(exc: BaseException) -> str:
    """A short, bounded label for why a pull failed (the message itself would explode cardinality)."""
    from pdmesh.kv.transfer.errors import Refused

    if isinstance(exc, Refused):
        return "refused"
    if "timed out" in str(exc) or isinstance(exc, TimeoutError):
        return "timeout"
    return "error"
