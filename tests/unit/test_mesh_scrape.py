"""The mesh-wide /metrics merge: one valid exposition, each family's HELP/TYPE once, every target's
samples kept apart by ``pdmesh_instance``; the live page's latency window."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.observability.coordinator_metrics import LatencyWindow, percentile
from pdmesh.observability.mesh_scrape import merge


def _worker_text(instance_id: str, running: int) -> str:
    """What a worker's /metrics looks like: pdmesh series labelled, process series not."""
    registry = CollectorRegistry()
    gauge = Gauge("pdmesh_worker_requests_running", "running", ["pdmesh_instance", "role"], registry=registry)
    gauge.labels(instance_id, "decode").set(running)
    steps = Histogram(
        "pdmesh_worker_step_duration_seconds",
        "steps",
        ["pdmesh_instance", "role", "phase"],
        registry=registry,
    )
    steps.labels(instance_id, "decode", "decode").observe(0.02)
    Counter("process_cpu_seconds_total", "cpu", registry=registry).inc(3)
    return generate_latest(registry).decode()


def _own_text() -> str:
    registry = CollectorRegistry()
    Counter("pdmesh_coordinator_requests_total", "requests", ["status"], registry=registry).labels(
        "200"
    ).inc()
    Counter("process_cpu_seconds_total", "cpu", registry=registry).inc(1)
    return generate_latest(registry).decode()


def _headers(text: str, kind: str) -> list[str]:
    return [line.split()[2] for line in text.splitlines() if line.startswith(f"# {kind} ")]


def test_merge_is_valid_text_with_each_family_once():
    text = merge(
        _own_text(),
        [("decode-0", _worker_text("decode-0", 2)), ("decode-1", _worker_text("decode-1", 5))],
    )
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses
    for kind in ("HELP", "TYPE"):
        names = _headers(text, kind)
        assert len(names) == len(set(names)), f"repeated {kind}: {sorted(names)}"
    running = {
        s.labels["pdmesh_instance"]: s.value for s in families["pdmesh_worker_requests_running"].samples
    }
    assert running == {"decode-0": 2.0, "decode-1": 5.0}
    steps = [s for s in families["pdmesh_worker_step_duration_seconds"].samples if s.name.endswith("_count")]
    assert sorted(s.labels["pdmesh_instance"] for s in steps) == ["decode-0", "decode-1"]
    assert families["pdmesh_coordinator_requests"].type == "counter"


def test_scraped_series_without_an_instance_label_get_their_target():
    text = merge(
        _own_text(), [("decode-0", _worker_text("decode-0", 1)), ("controller", _worker_text("x", 0))]
    )
    cpu = next(f for f in text_string_to_metric_families(text) if f.name == "process_cpu_seconds")
    by_instance = {s.labels.get("pdmesh_instance"): s.value for s in cpu.samples if s.name.endswith("_total")}
    assert by_instance == {None: 1.0, "decode-0": 3.0, "controller": 3.0}  # None: the coordinator's own


def test_merge_without_targets_is_the_own_exposition():
    families = {f.name for f in text_string_to_metric_families(merge(_own_text(), []))}
    assert families == {
        "pdmesh_coordinator_requests",
        "pdmesh_coordinator_requests_created",
        "process_cpu_seconds",
        "process_cpu_seconds_created",
    }


def test_latency_window_keeps_the_last_minute():
    window = LatencyWindow(window_s=60)
    for i in range(100):
        window.add("ttft", (i + 1) / 1000, now=1000.0)
    window.add("e2e", 0.5, now=1000.0)
    latency, rate = window.summary(now=1030.0)
    assert (latency["ttft_p50"], latency["ttft_p90"], latency["ttft_p99"]) == (0.05, 0.09, 0.099)
    assert latency["itl_p50"] is None and latency["e2e_p99"] == 0.5
    assert rate > 0
    latency, rate = window.summary(now=1061.0)  # every sample older than 60 s
    assert latency["ttft_p50"] is None and rate == 0


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
