"""What the compose and Kubernetes renderers share: paths in the image, probes, devices, layout."""

from __future__ import annotations

from pdmesh.deploy.cluster_file import ClusterFile, ClusterFileError

CLUSTER_FILE_DIR = "/etc/pdmesh"  # the cluster file is mounted read-only here in every container
CLUSTER_FILE_NAME = "user_config.json"
REDIS_PORT = 6379
ROLES = ("prefill", "decode")
WORKER_COMMANDS = {"prefill": "prefill-worker", "decode": "decode-worker"}
# Kubernetes extended resources of the device plugins (NVIDIA's and Ascend's).
DEVICE_RESOURCES = {"cuda": "nvidia.com/gpu", "npu": "huawei.com/Ascend910"}
ASCEND_DRIVER = "/usr/local/Ascend/driver"  # the host's NPU driver, which containers mount
STARTUP_GRACE_S = 600  # longest model load a startup probe waits for
COORDINATOR_GRACE_S = 45  # the coordinator's stop: its streams end, its servers close
DRAIN_MARGIN_S = 15  # termination grace beyond the drain timeout: deregistration and the server's stop


def device_kind(cluster: ClusterFile, role: str) -> str:
    """cpu, cuda or npu for ``role``'s workers."""
    return cluster.server(role).device.split(":")[0]


def model_mount(cluster: ClusterFile) -> str:
    """The host directory mounted read-only at the same path in every container (MindIE's
    weight_mount_path); it must hold modelWeightPath."""
    mount = (cluster.deploy_config.weight_mount_path or cluster.model.path).rstrip("/") or "/"
    path = cluster.model.path.rstrip("/")
    if not (path == mount or path.startswith(mount.rstrip("/") + "/")):
        raise ClusterFileError(
            f"model.modelWeightPath ({cluster.model.path}) must lie in "
            f"deploy_config.weight_mount_path ({mount}), which is what containers see"
        )
    return mount


def check_containers(cluster: ClusterFile) -> None:
    """What only a deployment in containers rules out; ClusterFileError names the key."""
    for role in ROLES:
        backend = cluster.server(role).transfer_backend
        if backend in ("shm", "cuda_ipc"):
            raise ClusterFileError(
                f"{role}.transfer_backend: {backend} needs prefill and decode in one process namespace; "
                "in containers use tcp, device or mooncake"
            )
        if ":" in cluster.server(role).device:
            raise ClusterFileError(
                f"{role}.device: {cluster.server(role).device}: name the kind only (cpu, cuda or npu); "
                "the container runtime hands each container its devices"
            )
    model_mount(cluster)


def grpc_probe(address: str) -> list[str]:
    """The command that exits 0 while the gRPC server at ``address`` reports SERVING."""
    return ["pdmesh", "deploy", "probe", "grpc", address]


def http_probe(url: str) -> list[str]:
    """The command that exits 0 while ``url`` answers 200."""
    return ["pdmesh", "deploy", "probe", "http", url]


def instance_names(cluster: ClusterFile, role: str) -> list[tuple[str, list[str]]]:
    """``(instance id, [pod names, leader first])`` of every instance of ``role``; LeaderWorkerSet's
    naming (group ``role-i``, followers ``role-i-1`` ...), so compose and Kubernetes agree."""
    out = []
    for i in range(cluster.instances(role)):
        leader = f"{role}-{i}"
        out.append((leader, [leader, *(f"{leader}-{j}" for j in range(1, cluster.pods(role)))]))
    return out
