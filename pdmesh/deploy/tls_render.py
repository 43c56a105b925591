"""``tls_config`` in the renders: which files each container mounts, where, and the flags that use them.

Every container finds its files in ``/etc/pdmesh/tls`` under their names in ``pdmesh certs``'
layout (``ca.pem``, ``<identity>.pem``/``.key``, ``crl.pem``; ``api-keys`` for the coordinator).
Compose mounts them as file secrets (bind mounts: a key keeps its mode 0600 and its owner, which
must be the image's user, uid 1000). Kubernetes mounts the Secret ``tls_config.k8s_secret_name``
that the user creates from the same files (``secret_command``); since a Secret volume with the pod's
``fsGroup`` is group-readable (0440), an init container copies the pod's own files into a memory
volume with mode 0600 (the services refuse looser keys), which the service mounts read-only.
"""

from __future__ import annotations

from typing import Any

from pdmesh.deploy.cluster_file import ClusterFile, ClusterFileError
from pdmesh.deploy.tls_config import (
    API_KEYS_NAME,
    CONTAINER_TLS_DIR,
    HTTP,
    all_files,
    check_files,
    host_files,
)

SECRET_DIR = "/etc/pdmesh/tls-secret"  # Kubernetes: the Secret as mounted (group-readable)
VOLUME, SECRET_VOLUME = "tls", "tls-secret"
PROBE_TIMEOUT_S = 10  # an exec probe starts a Python process: the kubelet's 1s default is too short


def check(cluster: ClusterFile) -> None:
    """ClusterFileError naming the key when a file a render mounts is missing or a key too open."""
    try:
        check_files(cluster.tls_config)
    except ValueError as exc:
        raise ClusterFileError(str(exc)) from None
    key_file = cluster.coordinator.api_key_file
    if key_file:
        import os

        if not os.path.isfile(key_file):
            raise ClusterFileError(f"coordinator.api_key_file: {key_file} does not exist or is not a file")


def container_names(cluster: ClusterFile, service: str) -> list[str]:
    """The names of the files ``service`` (controller, coordinator or worker) mounts."""
    tls = cluster.tls_config
    names = []
    if tls.management_tls_enable:
        names += [f.name for f in host_files(tls, service).values()]
    if service == "coordinator":
        if tls.http_server_tls_enable:
            names += [f.name for k, f in host_files(tls, tls.http_identity()).items() if k in ("cert", "key")]
        if cluster.coordinator.api_key_file:
            names.append(API_KEYS_NAME)
    return list(dict.fromkeys(names))


def api_key_flag(cluster: ClusterFile) -> list[str]:
    return (
        ["--api-key-file", f"{CONTAINER_TLS_DIR}/{API_KEYS_NAME}"] if cluster.coordinator.api_key_file else []
    )


def probe_flags(cluster: ClusterFile, service: str) -> list[str]:
    """``pdmesh deploy probe grpc`` / ``drain`` flags presenting ``service``'s certificate."""
    if not cluster.tls_config.management_tls_enable:
        return []
    files = host_files(cluster.tls_config, service)
    return [a for kind, f in files.items() for a in (f"--tls-{kind}", f"{CONTAINER_TLS_DIR}/{f.name}")]


# -- compose --------------------------------------------------------------------------------------


def compose_secrets(cluster: ClusterFile) -> dict[str, Any]:
    """The compose file's top-level ``secrets``: each file where it lies on this machine."""
    secrets = {name: {"file": str(f.path.resolve())} for name, f in all_files(cluster.tls_config).items()}
    if cluster.coordinator.api_key_file:
        from pathlib import Path

        secrets[API_KEYS_NAME] = {"file": str(Path(cluster.coordinator.api_key_file).resolve())}
    return secrets


def compose_service_secrets(cluster: ClusterFile, service: str) -> list[dict[str, str]]:
    return [{"source": n, "target": f"{CONTAINER_TLS_DIR}/{n}"} for n in container_names(cluster, service)]


# -- Kubernetes -----------------------------------------------------------------------------------


def k8s_parts(cluster: ClusterFile, service: str, image: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(volumes, the service container's mounts, init containers) for ``service``; empty when it
    mounts nothing."""
    names = container_names(cluster, service)
    if not names:
        return [], [], []
    secret = {
        "secretName": cluster.tls_config.k8s_secret_name,
        "items": [{"key": n, "path": n} for n in names],
        "defaultMode": 0o400,
    }
    volumes = [
        {"name": SECRET_VOLUME, "secret": secret},
        {"name": VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]
    sources = " ".join(f"{SECRET_DIR}/{n}" for n in names)
    init = {
        "name": "tls-files",
        "image": image,
        # as the service's user: the copies are its own, mode 0600 (API keys and certificates too)
        "command": ["sh", "-c", f"install -m 0600 {sources} {CONTAINER_TLS_DIR}/"],
        "volumeMounts": [
            {"name": SECRET_VOLUME, "mountPath": SECRET_DIR, "readOnly": True},
            {"name": VOLUME, "mountPath": CONTAINER_TLS_DIR},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
    }
    mounts = [{"name": VOLUME, "mountPath": CONTAINER_TLS_DIR, "readOnly": True}]
    return volumes, mounts, [init]


def k8s_secure_pod(cluster: ClusterFile, service: str, image: str, pod: dict[str, Any]) -> None:
    """Mounts ``service``'s files into ``pod`` (a pod spec with one container) and, with management
    TLS, swaps the kubelet's gRPC probes (plaintext only) for ``pdmesh deploy probe self``, which
    presents the container's own certificate; the coordinator's readiness probe speaks HTTPS."""
    container = pod["containers"][0]
    volumes, mounts, init = k8s_parts(cluster, service, image)
    if volumes:
        pod["volumes"] = [*pod.get("volumes", []), *volumes]
        container["volumeMounts"] = [*container.get("volumeMounts", []), *mounts]
        init[0]["securityContext"] = container["securityContext"]
        pod["initContainers"] = init
    tls = cluster.tls_config
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container.get(probe)
        if spec is None:
            continue
        if tls.management_tls_enable and "grpc" in spec:
            del spec["grpc"]
            spec["exec"] = {"command": ["pdmesh", "deploy", "probe", "self", "--timeout-s", "5"]}
            spec["timeoutSeconds"] = PROBE_TIMEOUT_S
        if tls.http_server_tls_enable and "httpGet" in spec:
            spec["httpGet"]["scheme"] = "HTTPS"


def cert_hosts(cluster: ClusterFile, target: str) -> list[str]:
    """The names services reach each other by in ``target`` (compose or k8s): every certificate
    must carry them (``pdmesh certs --host ...``)."""
    from pdmesh.deploy.common import ROLES, instance_names

    ns = cluster.deploy_config.namespace
    if target == "compose":
        hosts = ["controller", *(f"controller-{i}" for i in range(1, cluster.controller.replicas))]
        hosts += [pod for role in ROLES for _, pods in instance_names(cluster, role) for pod in pods]
        return [*hosts, "coordinator"]
    return [
        f"*.pdmesh-controller.{ns}.svc",
        f"*.pdmesh-prefill.{ns}.svc",
        f"*.pdmesh-decode.{ns}.svc",
        f"pdmesh-coordinator.{ns}.svc",
    ]


__all__ = ["HTTP", "check", "cert_hosts", "compose_secrets", "k8s_parts", "probe_flags"]
