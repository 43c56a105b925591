"""Kubernetes manifests from the cluster file: the namespace, the cluster file as a ConfigMap, Redis
(unless ``deploy_config.redis_url`` names one), the controllers (a StatefulSet: stable names, so
every client lists them all; 2 or more run active/standby over the Redis lease) with the RBAC that
their Kubernetes actuator needs, the coordinator (Deployment and Service) and one LeaderWorkerSet
per role (``k8s_workers``).

Files are numbered so that ``kubectl apply -f DIR`` creates the namespace first.
"""

from __future__ import annotations

import json
from typing import Any

from pdmesh.deploy import tls_render
from pdmesh.deploy.cluster_file import ClusterFile
from pdmesh.deploy.common import COORDINATOR_GRACE_S, REDIS_PORT, ROLES, check_containers
from pdmesh.deploy.k8s_pods import (
    CONFIGMAP,
    cluster_file_volume,
    container_security,
    field_env,
    grpc_probes,
    meta,
    model_volume,
    pod_security,
    selector,
)
from pdmesh.deploy.k8s_workers import LWS_API, leader_worker_set, lws_name
from pdmesh.deploy.observability import check_metrics, k8s_objects, metrics_container_port, pod_metadata
from pdmesh.deploy.settings import (
    COORDINATOR_GRPC_PORT,
    TLS_DIR,
    controller_config,
    coordinator_config,
    settings_argv,
    tls_flags,
)
from pdmesh.deploy.tls_config import redis_url as tls_redis_url

CONTROLLER = "pdmesh-controller"
COORDINATOR = "pdmesh-coordinator"
REDIS = "pdmesh-redis"
REDIS_UID = 999  # the official Redis image's redis user


def render_k8s(cluster: ClusterFile, cluster_file_text: str) -> dict[str, list[dict[str, Any]]]:
    """``{file name: [objects]}`` for the whole deployment."""
    check_containers(cluster)
    check_metrics(cluster)
    tls_render.check(cluster)
    d = cluster.deploy_config
    ns = d.namespace
    redis_url = d.redis_url or f"redis://{REDIS}.{ns}.svc:{REDIS_PORT}/0"
    controllers = [
        f"{CONTROLLER}-{i}.{CONTROLLER}.{ns}.svc:{d.controller_port}"
        for i in range(cluster.controller.replicas)
    ]
    controller = ",".join(controllers)
    files = {
        "00-namespace.yaml": [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"name": ns}}}
        ],
        "10-cluster-file.yaml": [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": meta(CONFIGMAP, ns, "config"),
                "data": {"user_config.json": cluster_file_text},
            }
        ],
    }
    if not d.redis_url:
        files["20-redis.yaml"] = _redis(ns, d.redis_image)
    files["30-controller.yaml"] = [*_controller_rbac(ns), *_controllers(cluster, redis_url)]
    files["40-coordinator.yaml"] = _coordinator(cluster, controller)
    for i, role in enumerate(ROLES):
        worker_redis = tls_redis_url(cluster.tls_config, redis_url, "worker", TLS_DIR)
        files[f"5{i}-{role}.yaml"] = [
            leader_worker_set(cluster, role, controller, worker_redis, d.image_name)
        ]
    target = f"{COORDINATOR}.{ns}.svc:{cluster.observability.metrics_port}"
    observability = k8s_objects(cluster, target, meta("x", ns, "observability")["labels"])
    if observability:
        files["60-observability.yaml"] = observability
    return files


def _service(name: str, ns: str, component: str, ports: list[tuple[str, int]], headless: bool = False):
    spec: dict[str, Any] = {
        "selector": selector(component),
        "ports": [{"name": n, "port": p, "targetPort": p} for n, p in ports],
    }
    if headless:
        # every controller's DNS name resolves from the start: clients find the standbys too
        spec.update(clusterIP="None", publishNotReadyAddresses=True)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(name, ns, component), "spec": spec}


def _redis(ns: str, image: str) -> list[dict[str, Any]]:
    container = {
        "name": "redis",
        "image": image,
        "args": ["--port", str(REDIS_PORT), "--save", "", "--appendonly", "no"],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
        "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 10},
        "securityContext": container_security(),
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(REDIS, ns, "redis"),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector("redis")},
            "template": {
                "metadata": {"labels": meta(REDIS, ns, "redis")["labels"]},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security(REDIS_UID),
                    "containers": [container],
                },
            },
        },
    }
    return [deployment, _service(REDIS, ns, "redis", [("redis", REDIS_PORT)])]


def _controller_rbac(ns: str) -> list[dict[str, Any]]:
    """What the Kubernetes actuator does: relabel a flipped instance's pods, scale a role."""
    rules = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "patch"]},
        {
            "apiGroups": [LWS_API.split("/")[0]],
            "resources": ["leaderworkersets", "leaderworkersets/scale"],
            "verbs": ["get", "list", "patch"],
        },
    ]
    subject = {"kind": "ServiceAccount", "name": CONTROLLER, "namespace": ns}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(CONTROLLER, ns, "controller")},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(CONTROLLER, ns, "controller"),
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta(CONTROLLER, ns, "controller"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROLLER},
            "subjects": [subject],
        },
    ]


def _controllers(cluster: ClusterFile, redis_url: str) -> list[dict[str, Any]]:
    d = cluster.deploy_config
    ns, port = d.namespace, d.controller_port
    config = controller_config(
        cluster,
        host="0.0.0.0",
        port=port,
        redis_url=tls_redis_url(cluster.tls_config, redis_url, "controller", TLS_DIR),
        advertise_address=f"$(POD_NAME).{CONTROLLER}.{ns}.svc:{port}",  # expanded by the kubelet
        metrics_port=cluster.observability.metrics_port,
    )
    if "actuator" in type(config).model_fields and "actuator" not in cluster.controller.model_fields_set:
        config = config.model_copy(update={"actuator": "kubernetes"})
    container = {
        "name": "controller",
        "image": d.image_name,
        "command": ["pdmesh", "controller"],
        "args": [*settings_argv(config), *tls_flags(cluster, "controller")],
        "env": [field_env("POD_NAME", "metadata.name"), field_env("POD_NAMESPACE", "metadata.namespace")],
        "ports": [{"name": "grpc", "containerPort": port}, *metrics_container_port(cluster)],
        "volumeMounts": [cluster_file_volume()[1]],
        "securityContext": container_security(),
        **grpc_probes(port),
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta(CONTROLLER, ns, "controller"),
        "spec": {
            "serviceName": CONTROLLER,
            "replicas": cluster.controller.replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector("controller")},
            "template": {
                "metadata": pod_metadata(cluster, meta(CONTROLLER, ns, "controller")["labels"]),
                "spec": {
                    "serviceAccountName": CONTROLLER,
                    "securityContext": pod_security(),
                    "terminationGracePeriodSeconds": 10,
                    "containers": [container],
                    "volumes": [cluster_file_volume()[0]],
                },
            },
        },
    }
    tls_render.k8s_secure_pod(cluster, "controller", d.image_name, statefulset["spec"]["template"]["spec"])
    return [_service(CONTROLLER, ns, "controller", [("grpc", port)], headless=True), statefulset]


def _coordinator(cluster: ClusterFile, controller: str) -> list[dict[str, Any]]:
    d = cluster.deploy_config
    ns = d.namespace
    grpc_port = cluster.coordinator.grpc_port or COORDINATOR_GRPC_PORT
    config = coordinator_config(
        cluster,
        host="0.0.0.0",
        controller=controller,
        grpc_port=grpc_port,
        metrics_port=cluster.observability.metrics_port,
    )
    probes = grpc_probes(grpc_port)  # alive while the process serves; ready once every instance is
    probes["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5}
    volumes, mounts = zip(cluster_file_volume(), model_volume(cluster), strict=True)
    container = {
        "name": "coordinator",
        "image": d.image_name,
        "command": ["pdmesh", "coordinator"],
        "args": [
            *settings_argv(config, skip=("api_key_file",)),
            *tls_flags(cluster, "coordinator"),
            *tls_render.api_key_flag(cluster),
        ],
        "ports": [
            {"name": "http", "containerPort": config.http_port},
            {"name": "grpc", "containerPort": grpc_port},
            *metrics_container_port(cluster),
        ],
        "volumeMounts": list(mounts),
        "securityContext": container_security(),
        **probes,
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(COORDINATOR, ns, "coordinator"),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector("coordinator")},
            "template": {
                "metadata": pod_metadata(cluster, meta(COORDINATOR, ns, "coordinator")["labels"]),
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security(),
                    "terminationGracePeriodSeconds": COORDINATOR_GRACE_S,
                    "containers": [container],
                    "volumes": list(volumes),
                },
            },
        },
    }
    tls_render.k8s_secure_pod(cluster, "coordinator", d.image_name, deployment["spec"]["template"]["spec"])
    ports = [("http", config.http_port), ("grpc", grpc_port)]
    if config.metrics_port is not None:  # the one target a Prometheus needs: /metrics/mesh
        ports.append(("metrics", config.metrics_port))
    return [deployment, _service(COORDINATOR, ns, "coordinator", ports)]


def cluster_file_json(cluster: ClusterFile) -> str:
    """The cluster file as the ConfigMap holds it: every key, MindIE's names."""
    return json.dumps(cluster.model_dump(mode="json", by_alias=True), indent=2) + "\n"


__all__ = ["render_k8s", "cluster_file_json", "lws_name"]
