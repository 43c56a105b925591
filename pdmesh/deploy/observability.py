"""Prometheus and Grafana beside a rendered deployment, from the files in ``deploy/observability``.

Every service gets ``--metrics-port`` (the cluster file's ``observability.metrics_port``, 9464 by
default) and exposes it; the coordinator's port also serves ``/metrics/mesh``, every worker's and
the active controller's series with its own, so Prometheus needs one target. The cluster file opts
in to the rest: ``observability.prometheus`` and ``observability.grafana`` add, in compose, a
Prometheus service scraping the coordinator and a Grafana service with the dashboard provisioned;
in Kubernetes, where an operator runs their own, the scrape config and the dashboard as ConfigMaps
(the dashboard labelled ``grafana_dashboard: "1"``, which Grafana's dashboard sidecar loads), and
the ``prometheus.io/*`` annotations on every pod that serves metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pdmesh.deploy.cluster_file import ClusterFile, ClusterFileError

FILES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "observability"
PROMETHEUS_FILE = "prometheus.yml"
DASHBOARD_FILE = "grafana-dashboard.json"
GRAFANA_DATASOURCE_FILE = "grafana/datasource.yml"
GRAFANA_DASHBOARDS_FILE = "grafana/dashboards.yml"
OUT_DIR = "observability"  # compose: the files the Prometheus and Grafana services mount
MESH_PATH = "/metrics/mesh"
PROMETHEUS_PORT = 9090
GRAFANA_PORT = 3000
GRAFANA_DASHBOARD_DIR = "/var/lib/grafana/dashboards/pdmesh"  # grafana/dashboards.yml's path
GRAFANA_PROVISIONING = "/etc/grafana/provisioning"
PROMETHEUS_CONFIGMAP = "pdmesh-prometheus"
DASHBOARD_CONFIGMAP = "pdmesh-grafana-dashboard"
SCRAPE_JOB = "pdmesh"


def source_text(name: str, key: str, files_dir: Path = FILES_DIR) -> str:
    """A file of deploy/observability; ClusterFileError naming ``key`` (the option that needs it)."""
    path = files_dir / name
    try:
        return path.read_text()
    except OSError as exc:
        raise ClusterFileError(
            f"observability.{key}: cannot read {path} ({exc.strerror or exc}); "
            "it ships in pdmesh's source tree under deploy/observability"
        ) from None


def prometheus_config(target: str, files_dir: Path = FILES_DIR) -> str:
    """deploy/observability/prometheus.yml with its pdmesh job scraping ``target``'s /metrics/mesh."""
    config = yaml.safe_load(source_text(PROMETHEUS_FILE, "prometheus", files_dir))
    job = next((j for j in config.get("scrape_configs", []) if j.get("job_name") == SCRAPE_JOB), None)
    if job is None:
        raise ClusterFileError(
            f"observability.prometheus: {files_dir / PROMETHEUS_FILE} has no '{SCRAPE_JOB}' job"
        )
    job["metrics_path"] = MESH_PATH
    job["static_configs"] = [{"targets": [target]}]
    header = "# Rendered by `pdmesh deploy render` from deploy/observability/prometheus.yml.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def scrape_annotations(cluster: ClusterFile) -> dict[str, str]:
    """Pod annotations that annotation-based Prometheus discovery reads (empty without metrics).
    They name each pod's own /metrics: use them or the one /metrics/mesh target, not both, or
    every worker series is scraped twice."""
    port = cluster.observability.metrics_port
    if port is None:
        return {}
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def pod_metadata(cluster: ClusterFile, labels: dict[str, str]) -> dict[str, Any]:
    """A pod template's metadata: its labels and, with metrics on, the scrape annotations."""
    annotations = scrape_annotations(cluster)
    return {"labels": labels, "annotations": annotations} if annotations else {"labels": labels}


def metrics_container_port(cluster: ClusterFile) -> list[dict[str, Any]]:
    port = cluster.observability.metrics_port
    return [] if port is None else [{"name": "metrics", "containerPort": port}]


def compose_files(cluster: ClusterFile, coordinator_target: str) -> dict[str, str]:
    """``{path under the output directory: text}`` that the compose services mount."""
    obs = cluster.observability
    files = {}
    if obs.prometheus:
        files[f"{OUT_DIR}/{PROMETHEUS_FILE}"] = prometheus_config(coordinator_target)
    if obs.grafana:
        files[f"{OUT_DIR}/{DASHBOARD_FILE}"] = source_text(DASHBOARD_FILE, "grafana")
        files[f"{OUT_DIR}/grafana-dashboards.yml"] = source_text(GRAFANA_DASHBOARDS_FILE, "grafana")
        if obs.prometheus:  # the datasource is the prometheus service
            files[f"{OUT_DIR}/grafana-datasource.yml"] = source_text(GRAFANA_DATASOURCE_FILE, "grafana")
    return files


def _http_check(url: str) -> dict[str, Any]:
    # both images are busybox/alpine based: wget is there, curl is not
    return {
        "test": ["CMD", "wget", "-q", "--spider", url],
        "interval": "5s",
        "timeout": "4s",
        "retries": 3,
        "start_period": "30s",
        "start_interval": "1s",
    }


def compose_services(cluster: ClusterFile) -> dict[str, dict[str, Any]]:
    """The prometheus and grafana services the cluster file asks for (their ports published)."""
    obs = cluster.observability
    services: dict[str, dict[str, Any]] = {}
    if obs.prometheus:
        services["prometheus"] = {
            "image": obs.prometheus_image,
            "command": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"],
            "healthcheck": _http_check(f"http://127.0.0.1:{PROMETHEUS_PORT}/-/ready"),
            "restart": "unless-stopped",
            "volumes": [f"./{OUT_DIR}/{PROMETHEUS_FILE}:/etc/prometheus/prometheus.yml:ro"],
            "ports": [f"{PROMETHEUS_PORT}:{PROMETHEUS_PORT}"],
        }
    if obs.grafana:
        volumes = [
            f"./{OUT_DIR}/{DASHBOARD_FILE}:{GRAFANA_DASHBOARD_DIR}/{DASHBOARD_FILE}:ro",
            f"./{OUT_DIR}/grafana-dashboards.yml:{GRAFANA_PROVISIONING}/dashboards/pdmesh.yml:ro",
        ]
        if obs.prometheus:
            volumes.append(
                f"./{OUT_DIR}/grafana-datasource.yml:{GRAFANA_PROVISIONING}/datasources/pdmesh.yml:ro"
            )
        services["grafana"] = {
            "image": obs.grafana_image,
            "environment": {
                "GF_AUTH_ANONYMOUS_ENABLED": "true",  # viewers need no account; editing still does
                "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
                "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": f"{GRAFANA_DASHBOARD_DIR}/{DASHBOARD_FILE}",
            },
            "healthcheck": _http_check(f"http://127.0.0.1:{GRAFANA_PORT}/api/health"),
            "restart": "unless-stopped",
            "volumes": volumes,
            "ports": [f"{GRAFANA_PORT}:{GRAFANA_PORT}"],
        }
        if obs.prometheus:
            services["grafana"]["depends_on"] = {"prometheus": {"condition": "service_healthy"}}
    return services


def k8s_objects(
    cluster: ClusterFile, coordinator_target: str, labels: dict[str, str]
) -> list[dict[str, Any]]:
    """The scrape config and the dashboard as ConfigMaps, as the cluster file asks for them."""
    obs, ns = cluster.observability, cluster.deploy_config.namespace
    objects = []
    if obs.prometheus:
        objects.append(
            _configmap(
                PROMETHEUS_CONFIGMAP, ns, labels, PROMETHEUS_FILE, prometheus_config(coordinator_target)
            )
        )
    if obs.grafana:
        dashboard_labels = {**labels, "grafana_dashboard": "1"}  # what Grafana's sidecar watches for
        text = source_text(DASHBOARD_FILE, "grafana")
        objects.append(_configmap(DASHBOARD_CONFIGMAP, ns, dashboard_labels, "pdmesh.json", text))
    return objects


def _configmap(name: str, ns: str, labels: dict[str, str], key: str, text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "data": {key: text},
    }


def check_metrics(cluster: ClusterFile) -> None:
    """Prometheus scrapes the coordinator's metrics port: it has to have one."""
    obs = cluster.observability
    if obs.prometheus and obs.metrics_port is None:
        raise ClusterFileError("observability.prometheus: needs observability.metrics_port (it is null)")
