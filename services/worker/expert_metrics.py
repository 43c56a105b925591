"""The routed experts' load series of a parallel MoE worker (EPLB), read when Prometheus scrapes.

From the leader rank's counts (``pdmesh.parallel.eplb_runtime.expert_stats``; at dp 1 every token,
at dp > 1 the tokens of the leader's replica), labelled ``{pdmesh_instance, role}`` and:

- ``pdmesh_worker_expert_tokens_total{layer, expert}``: (token, expert) pairs routed since start;
- ``pdmesh_worker_expert_window_tokens{layer, expert}``: the same over the balancer's window;
- ``pdmesh_worker_expert_replicas{layer, expert}``: the expert's copies (redundant experts);
- ``pdmesh_worker_ep_rank_load{layer, ep_rank}``: each ep rank's share of the window;
- ``pdmesh_worker_ep_rank_imbalance{layer}``: max / mean of those shares (1: even).

``pdmesh ctl experts`` reads them back from a worker's ``/metrics``; ``rebalance`` is what its
``--rebalance`` asks for (the ``RebalanceExperts`` RPC).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdmesh.models.moe import RoutedExperts
from services.worker.metrics import LABELS, WorkerMetrics


class RebalanceRefused(Exception):
    """This worker has no experts to rebalance; the message says why."""


def rebalance(engine) -> dict:
    """Rebalances the leader's instance now (blocking: waits for the running step, and the next
    waits for it); the report of ``eplb_runtime.rebalance``. ``RebalanceRefused`` when the model
    has no MoE layers or its experts are not split over ep ranks; ``GroupBroken`` if a rank fails."""
    if not any(isinstance(m, RoutedExperts) for m in engine.runner.model.modules()):
        raise RebalanceRefused("the model has no MoE layers: there are no experts to rebalance")
    executor = engine.executor
    if executor is None or executor.state.layout.moe_ep == 1:
        raise RebalanceRefused(
            "the experts are not split over ranks (moe_ep 1): every rank holds every expert; "
            "start the worker with --moe-ep > 1 to balance them"
        )
    return executor.rebalance()


class ExpertLoadCollector(Collector):
    """The expert series of every parallel MoE worker in this process."""

    def __init__(self) -> None:
        self._sources: weakref.WeakKeyDictionary[WorkerMetrics, Callable[[], list[dict]]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def add(self, metrics: WorkerMetrics, stats: Callable[[], list[dict]]) -> None:
        with self._lock:
            self._sources[metrics] = stats

    def remove(self, metrics: WorkerMetrics) -> None:
        with self._lock:
            self._sources.pop(metrics, None)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        expert_labels = [*LABELS, "layer", "expert"]
        total = CounterMetricFamily(
            "pdmesh_worker_expert_tokens", "(token, expert) pairs routed to each expert", labels=expert_labels
        )
        window = GaugeMetricFamily(
            "pdmesh_worker_expert_window_tokens",
            "(token, expert) pairs routed to each expert over the EPLB window",
            labels=expert_labels,
        )
        replicas = GaugeMetricFamily(
            "pdmesh_worker_expert_replicas",
            "Copies of each routed expert over the ranks",
            labels=expert_labels,
        )
        rank_load = GaugeMetricFamily(
            "pdmesh_worker_ep_rank_load",
            "Each ep rank's (token, expert) pairs over the EPLB window",
            labels=[*LABELS, "layer", "ep_rank"],
        )
        imbalance = GaugeMetricFamily(
            "pdmesh_worker_ep_rank_imbalance",
            "max / mean of the ep ranks' loads over the EPLB window (1: even)",
            labels=[*LABELS, "layer"],
        )
        with self._lock:
            sources = list(self._sources.items())
        for metrics, stats_of in sources:
            base = [metrics.instance_id, metrics.role()]
            for layer, stats in enumerate(stats_of()):
                at = [*base, str(layer)]
                for e, (t, w, r) in enumerate(
                    zip(stats["total"], stats["window"], stats["replicas"], strict=True)
                ):
                    total.add_metric([*at, str(e)], t)
                    window.add_metric([*at, str(e)], w)
                    replicas.add_metric([*at, str(e)], r)
                for rank, load in enumerate(stats["rank_loads"]):
                    rank_load.add_metric([*at, str(rank)], load)
                imbalance.add_metric(at, stats["imbalance"])
        yield from (total, window, replicas, rank_load, imbalance)

    def describe(self) -> list:
        return []


EXPERTS = ExpertLoadCollector()
REGISTRY.register(EXPERTS)
