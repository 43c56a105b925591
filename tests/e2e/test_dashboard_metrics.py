"""The Grafana dashboard against a real stack: after real requests, the one target its Prometheus
scrapes (the coordinator's /metrics/mesh) serves every metric its panels query, except those that
only an event this stack does not have creates (a retry, a flip, a failed transfer, a ratio, a
parallel instance), and the goodput query's bucket selector picks exactly one served bucket."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.observability.names import base_name, names_in
from tests.e2e.conftest import start_stack

pytestmark = pytest.mark.timeout(240)

DASHBOARD = json.loads(
    (Path(__file__).resolve().parents[2] / "deploy" / "observability" / "grafana-dashboard.json").read_text()
)
# Series that exist only once something happens that a healthy 1P1D stack with the ratio off never does.
AFTER_AN_EVENT = {
    "pdmesh_coordinator_retries_total": "labelled by cause: the first retry creates it",
    "pdmesh_controller_role_flips_total": "labelled: the first flip creates it",
    "pdmesh_controller_role_instances_target": "absent while the ratio is off",
    "pdmesh_worker_kv_transfer_failures_total": "labelled by cause: the first failure creates it",
    "pdmesh_worker_collective_duration_seconds": "parallel (tp/dp) instances only",
}


@pytest.fixture(scope="module")
def stack(tiny_qwen3, tmp_path_factory):
    stack = start_stack(tiny_qwen3, tmp_path_factory, prefill=1, decode=1, mode="pd")
    try:
        yield stack
    finally:
        stack.stop()


def dashboard_metrics() -> set[str]:
    return names_in(" ".join(t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])))


def scrape(stack) -> list:
    response = httpx.get(f"http://{stack.metrics_address('coordinator')}/metrics/mesh", timeout=30)
    assert response.status_code == 200
    return [s for family in text_string_to_metric_families(response.text) for s in family.samples]


def test_every_panel_has_data_after_requests(stack):
    model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    prompt = " ".join(f"word{i}" for i in range(64))  # several KV blocks: the second request hits them
    body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": True}
    for _ in range(2):
        with httpx.stream("POST", f"{stack.base_url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            response.read()
    samples = scrape(stack)
    served = {base_name(s.name) for s in samples}
    missing = dashboard_metrics() - served - set(AFTER_AN_EVENT)
    assert not missing, f"queried by the dashboard, not served: {sorted(missing)}"
    workers = [s for s in samples if s.name.startswith("pdmesh_worker_kv_blocks_free")]
    assert {s.labels["pdmesh_instance"] for s in workers} == {"prefill-0", "decode-0"}
    assert all("instance" not in s.labels for s in samples if s.name.startswith("pdmesh_"))

    # goodput: the dashboard's selector for the SLO edge matches one bucket of the served histogram
    edges = [
        s.labels["le"]
        for s in samples
        if s.name == "pdmesh_coordinator_time_to_first_token_seconds_bucket" and not s.labels.get("endpoint")
    ]
    slo = next(v for v in DASHBOARD["templating"]["list"] if v["name"] == "ttft_slo")
    for choice in slo["query"].split(","):
        assert len([e for e in edges if re.fullmatch(rf"{choice}(\.0)?", e)]) == 1, (choice, edges)
