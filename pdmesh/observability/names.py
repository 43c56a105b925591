"""Every Prometheus metric pdmesh serves, by its exact name: one list that the services, the Grafana
dashboard, the docs and their tests read, so a name cannot drift between them.

Histograms are listed by their base name (Prometheus adds ``_bucket``, ``_sum`` and ``_count``);
counters by their full name with ``_total``. Worker series carry ``pdmesh_instance`` (never
``instance``, which Prometheus sets to the scrape target) and ``role``.
"""

from __future__ import annotations

import re

COORDINATOR_METRICS = [
    "pdmesh_coordinator_requests_total",
    "pdmesh_coordinator_time_to_first_token_seconds",
    "pdmesh_coordinator_inter_token_latency_seconds",
    "pdmesh_coordinator_e2e_request_latency_seconds",
    "pdmesh_coordinator_queue_time_seconds",
    "pdmesh_coordinator_prompt_tokens_total",
    "pdmesh_coordinator_generation_tokens_total",
    "pdmesh_coordinator_retries_total",
    "pdmesh_coordinator_migrations_total",
    "pdmesh_coordinator_requests_inflight",
    "pdmesh_coordinator_requests_queued",
    "pdmesh_coordinator_route_choices_total",
    "pdmesh_coordinator_scrape_failures_total",
]
WORKER_METRICS = [
    "pdmesh_worker_requests_running",
    "pdmesh_worker_requests_waiting",
    "pdmesh_worker_kv_blocks_used",
    "pdmesh_worker_kv_blocks_free",
    "pdmesh_worker_prefix_cache_queries_tokens_total",
    "pdmesh_worker_prefix_cache_hits_tokens_total",
    "pdmesh_worker_step_duration_seconds",
    "pdmesh_worker_batch_size",
    "pdmesh_worker_kv_transfer_bytes_total",
    "pdmesh_worker_kv_transfer_duration_seconds",
    "pdmesh_worker_kv_transfer_failures_total",
    "pdmesh_worker_kv_handles_total",
    "pdmesh_worker_collective_duration_seconds",
    "pdmesh_worker_expert_tokens_total",
    "pdmesh_worker_expert_window_tokens",
    "pdmesh_worker_expert_replicas",
    "pdmesh_worker_ep_rank_load",
    "pdmesh_worker_ep_rank_imbalance",
]
CONTROLLER_METRICS = [
    "pdmesh_controller_instances",
    "pdmesh_controller_role_instances_target",
    "pdmesh_controller_role_flips_total",
    "pdmesh_controller_lease_active",
    "pdmesh_controller_fencing_token",
    "pdmesh_controller_takeovers_total",
]
METRIC_NAMES = [*COORDINATOR_METRICS, *WORKER_METRICS, *CONTROLLER_METRICS]
HISTOGRAMS = [
    "pdmesh_coordinator_time_to_first_token_seconds",
    "pdmesh_coordinator_inter_token_latency_seconds",
    "pdmesh_coordinator_e2e_request_latency_seconds",
    "pdmesh_coordinator_queue_time_seconds",
    "pdmesh_worker_step_duration_seconds",
    "pdmesh_worker_batch_size",
    "pdmesh_worker_kv_transfer_duration_seconds",
    "pdmesh_worker_collective_duration_seconds",
]
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
INSTANCE_LABEL = "pdmesh_instance"  # a label, not a metric: the instance id on worker series
_NAME = re.compile(r"\bpdmesh_[a-z0-9_]+")


def base_name(series: str) -> str:
    """The listed name a series name belongs to (a histogram's ``_bucket``/``_sum``/``_count``
    series map to the histogram); the name itself when it is not one of those."""
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix) and series[: -len(suffix)] in HISTOGRAMS:
            return series[: -len(suffix)]
    return series


def names_in(text: str) -> set[str]:
    """Every ``pdmesh_*`` metric name mentioned in ``text`` (a PromQL query, a doc), as listed names."""
    return {base_name(name) for name in _NAME.findall(text) if name != INSTANCE_LABEL}
