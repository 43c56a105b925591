"""Pieces of Kubernetes pod specs that every pdmesh workload shares: labels, security, volumes,
probes and the downward-API environment."""

from __future__ import annotations

from typing import Any

from pdmesh.deploy.cluster_file import ClusterFile
from pdmesh.deploy.common import CLUSTER_FILE_DIR, STARTUP_GRACE_S, model_mount

APP = "pdmesh"
ROLE_LABEL = "pdmesh.io/role"
UID = 1000  # the image's non-root user (deploy/docker/Dockerfile)
CONFIGMAP = "pdmesh-cluster-file"
PROBE_PERIOD_S = 5


def labels(component: str, **extra: str) -> dict[str, str]:
    """Recommended labels plus pdmesh's own; ``component`` is the role or service."""
    return {
        "app.kubernetes.io/name": APP,
        "app.kubernetes.io/part-of": APP,
        "app.kubernetes.io/component": component,
        **extra,
    }


def selector(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component}


def meta(name: str, namespace: str, component: str, **extra: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels(component, **extra)}


def field_env(name: str, path: str) -> dict[str, Any]:
    """An environment variable from the pod's own fields (downward API)."""
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def env(name: str, value: str) -> dict[str, str]:
    return {"name": name, "value": value}


def container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }


def pod_security(uid: int = UID) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def cluster_file_volume() -> tuple[dict, dict]:
    """(volume, mount) of the cluster file's ConfigMap, read-only at /etc/pdmesh."""
    volume = {"name": "cluster-file", "configMap": {"name": CONFIGMAP}}
    return volume, {"name": "cluster-file", "mountPath": CLUSTER_FILE_DIR, "readOnly": True}


def model_volume(cluster: ClusterFile) -> tuple[dict, dict]:
    """(volume, mount) of the weights: a PersistentVolumeClaim, or the node's directory (hostPath),
    mounted read-only at the same path, as MindIE mounts weight_mount_path."""
    path = model_mount(cluster)
    pvc = cluster.deploy_config.model_pvc
    if pvc:
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": pvc, "readOnly": True}}
    else:
        volume = {"name": "model", "hostPath": {"path": path, "type": "Directory"}}
    return volume, {"name": "model", "mountPath": path, "readOnly": True}


def shm_volume() -> tuple[dict, dict]:
    """A memory-backed /dev/shm: the default 64 MiB is too small for torch's and gloo's buffers."""
    return {"name": "dshm", "emptyDir": {"medium": "Memory"}}, {"name": "dshm", "mountPath": "/dev/shm"}


def grpc_probes(port: int, service: str = "") -> dict[str, Any]:
    """Startup (long enough for a model load), readiness and liveness on the gRPC health service."""
    check = {"grpc": {"port": port, "service": service}}
    return {
        "startupProbe": {
            **check,
            "periodSeconds": PROBE_PERIOD_S,
            "failureThreshold": STARTUP_GRACE_S // PROBE_PERIOD_S,
        },
        "readinessProbe": {**check, "periodSeconds": PROBE_PERIOD_S, "failureThreshold": 2},
        "livenessProbe": {**check, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
    }
