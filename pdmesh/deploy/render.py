"""`pdmesh deploy render`: writes a target's manifests and the cluster file they came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pdmesh.deploy.cluster_file import ClusterFile, load_cluster_file
from pdmesh.deploy.common import CLUSTER_FILE_NAME
from pdmesh.deploy.compose import ComposeRenderer
from pdmesh.deploy.k8s import cluster_file_json, render_k8s
from pdmesh.deploy.observability import compose_files

COMPOSE_FILE = "compose.yaml"
HEADER = "# Rendered by `pdmesh deploy render` from the cluster file; edit that file and render again.\n"


def render_compose(cluster: ClusterFile) -> dict[str, str]:
    """``{file name: text}``: compose.yaml, the cluster file it mounts and, as the cluster file asks,
    the Prometheus and Grafana files (under observability/)."""
    document = ComposeRenderer(cluster, CLUSTER_FILE_NAME).render()
    files = {COMPOSE_FILE: HEADER + _dump([document]), CLUSTER_FILE_NAME: cluster_file_json(cluster)}
    target = f"coordinator:{cluster.observability.metrics_port}"
    return files | compose_files(cluster, target)


def render_kubernetes(cluster: ClusterFile) -> dict[str, str]:
    """``{file name: text}``: one multi-document YAML file per part, numbered in apply order."""
    files = render_k8s(cluster, cluster_file_json(cluster))
    return {name: HEADER + _dump(objects) for name, objects in files.items()}


def render_to(config: Path, target: str, out: Path) -> list[Path]:
    """Renders ``config`` for ``target`` (compose or k8s) into ``out``; returns the files written."""
    cluster = load_cluster_file(config)
    files = render_compose(cluster) if target == "compose" else render_kubernetes(cluster)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


class _Dumper(yaml.SafeDumper):
    """Writes shared parts out in full: manifests read better without YAML anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(documents: list[Any]) -> str:
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
