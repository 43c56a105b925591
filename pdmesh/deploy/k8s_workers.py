"""Each role's instances as one LeaderWorkerSet: ``replicas`` instances (groups) of
``single_*_instance_pod_num`` pods that start and restart together; the leader (worker index 0) is
rank 0 and serves the worker's gRPC API.

LeaderWorkerSet gives every pod ``LWS_LEADER_ADDRESS``, ``LWS_GROUP_SIZE`` and ``LWS_WORKER_INDEX``;
the instance id is the leader pod's name (stable across restarts), which followers read from the
``leaderworkerset.sigs.k8s.io/leader-name`` annotation. On termination the leader first drains
(``pdmesh deploy drain``: offline at the coordinators, in-flight work finishes) within the pod's grace.
"""

from __future__ import annotations

from typing import Any

from pdmesh.deploy.cluster_file import ClusterFile
from pdmesh.deploy.common import ASCEND_DRIVER, DEVICE_RESOURCES, DRAIN_MARGIN_S, WORKER_COMMANDS, device_kind
from pdmesh.deploy.k8s_pods import (
    ROLE_LABEL,
    cluster_file_volume,
    container_security,
    env,
    field_env,
    grpc_probes,
    labels,
    meta,
    model_volume,
    pod_security,
    shm_volume,
)
from pdmesh.deploy.observability import metrics_container_port, pod_metadata
from pdmesh.deploy.settings import settings_argv, tls_flags, worker_config
from pdmesh.deploy.tls_render import k8s_secure_pod, probe_flags

LWS_API = "leaderworkerset.x-k8s.io/v1"
LEADER_NAME_ANNOTATION = "leaderworkerset.sigs.k8s.io/leader-name"
WORKER_SERVICE = "pdmesh.v1.Worker"
# Set per pod from its environment (pod IP, names), never as flags: flags would win over them.
POD_FIELDS = ("role", "host", "instance_id", "controller")


def lws_name(role: str) -> str:
    return f"pdmesh-{role}"


def leader_worker_set(
    cluster: ClusterFile, role: str, controller: str, redis_url: str, image: str
) -> dict[str, Any]:
    d = cluster.deploy_config
    config = worker_config(
        cluster,
        role,
        host="0.0.0.0",
        port=d.worker_port,
        controller=controller,
        redis_url=redis_url,
        transfer_port=d.worker_transfer_port,
        metrics_port=cluster.observability.metrics_port,
    )
    args = [*settings_argv(config, skip=POD_FIELDS), *tls_flags(cluster, "worker")]
    base_env = [
        field_env("PDMESH_WORKER_HOST", "status.podIP"),  # the address it registers must be routable
        env("PDMESH_WORKER_CONTROLLER", controller),
    ]
    if cluster.tls_config.management_tls_enable:
        # peers check the name a worker registers against its certificate, which cannot know pod IPs:
        # the pod's DNS name under LeaderWorkerSet's headless Service (*.pdmesh-<role>.<ns>.svc)
        host = f"$(POD_NAME).{lws_name(role)}.{d.namespace}.svc"
        base_env = [field_env("POD_NAME", "metadata.name"), env("PDMESH_WORKER_HOST", host), base_env[1]]
    leader = _pod(
        cluster, role, image, args, [*base_env, field_env("PDMESH_WORKER_INSTANCE_ID", "metadata.name")]
    )
    follower_env = field_env("PDMESH_WORKER_INSTANCE_ID", f"metadata.annotations['{LEADER_NAME_ANNOTATION}']")
    follower = _pod(cluster, role, image, args, [*base_env, follower_env], leader=False)
    return {
        "apiVersion": LWS_API,
        "kind": "LeaderWorkerSet",
        "metadata": meta(lws_name(role), d.namespace, role, **{ROLE_LABEL: role}),
        "spec": {
            "replicas": cluster.instances(role),
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {
                "type": "RollingUpdate",
                "rollingUpdateConfiguration": {"maxUnavailable": 1, "maxSurge": 0},
            },
            "leaderWorkerTemplate": {
                "size": cluster.pods(role),
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": leader,
                "workerTemplate": follower,
            },
        },
    }


def _pod(
    cluster: ClusterFile, role: str, image: str, args: list[str], pod_env: list[dict], leader: bool = True
) -> dict[str, Any]:
    """A leader's or follower's pod template. Followers have no gRPC server of their own to probe:
    the group restarts as one when any pod fails (RecreateGroupOnPodRestart)."""
    d = cluster.deploy_config
    parts = [cluster_file_volume(), model_volume(cluster), shm_volume()]
    if device_kind(cluster, role) == "npu":
        driver = {"name": "ascend-driver", "hostPath": {"path": ASCEND_DRIVER, "type": "Directory"}}
        parts.append((driver, {"name": "ascend-driver", "mountPath": ASCEND_DRIVER, "readOnly": True}))
    volumes, mounts = zip(*parts, strict=True)
    container: dict[str, Any] = {
        "name": "worker",
        "image": image,
        "command": ["pdmesh", WORKER_COMMANDS[role]],
        "args": args,
        "env": pod_env,
        "ports": [
            {"name": "grpc", "containerPort": d.worker_port},
            {"name": "kv-transfer", "containerPort": d.worker_transfer_port},
            *metrics_container_port(cluster),
        ],
        "volumeMounts": list(mounts),
        "securityContext": container_security(),
        "resources": _resources(cluster, role),
    }
    drain_s = int(cluster.controller.drain_timeout_s)
    if leader:
        container.update(grpc_probes(d.worker_port, WORKER_SERVICE))
        drain = ["pdmesh", "deploy", "drain", "--timeout-s", str(drain_s)]
        container["lifecycle"] = {"preStop": {"exec": {"command": [*drain, *probe_flags(cluster, "worker")]}}}
    component = "leader" if leader else "follower"
    pod_labels = labels(role, **{ROLE_LABEL: role, "pdmesh.io/rank-role": component})
    pod = {
        # the leader serves the instance's metrics (as it serves its gRPC API)
        "metadata": pod_metadata(cluster, pod_labels) if leader else {"labels": pod_labels},
        "spec": {
            "automountServiceAccountToken": False,
            "securityContext": _pod_security(cluster, role),
            "terminationGracePeriodSeconds": drain_s + DRAIN_MARGIN_S,
            "containers": [container],
            "volumes": list(volumes),
        },
    }
    k8s_secure_pod(cluster, "worker", image, pod["spec"])
    return pod


def _pod_security(cluster: ClusterFile, role: str) -> dict[str, Any]:
    security = pod_security()
    if device_kind(cluster, role) == "npu":
        security["supplementalGroups"] = [1000]  # HwHiAiUser's group: access to the Ascend device nodes
    return security


def _resources(cluster: ClusterFile, role: str) -> dict[str, Any]:
    """Device requests (extended resources are requested as limits) and a CPU floor."""
    kind = device_kind(cluster, role)
    resources: dict[str, Any] = {"requests": {"cpu": "1", "memory": "2Gi"}}
    if kind in DEVICE_RESOURCES:
        resources["limits"] = {DEVICE_RESOURCES[kind]: cluster.devices_per_pod(role)}
    return resources
