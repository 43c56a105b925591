"""``pdmesh up --config``: the cluster file as a local stack (``pdmesh.launcher.StackSpec``).

The local stack picks free ports and its own instance ids, so only the services' tunables come from
the file; flags given on the command line override the file's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pdmesh.deploy.cluster_file import ClusterFile, ClusterFileError
from pdmesh.deploy.settings import (
    CONTROLLER_RUNTIME_FLAGS,
    WORKER_RUNTIME_FLAGS,
    controller_config,
    coordinator_config,
    settings_args,
    worker_config,
)
from pdmesh.launcher import StackSpec

# Placeholders where the local stack fills in the real values (free ports, the Redis it starts).
_HOST, _CONTROLLER, _REDIS = "127.0.0.1", "127.0.0.1:1", "redis://127.0.0.1:1/0"


@dataclass
class UpOverrides:
    """``pdmesh up`` flags that were given (None: take the file's value)."""

    model: Path | None = None
    prefill: int | None = None
    decode: int | None = None
    mode: str | None = None
    host: str | None = None
    http_port: int | None = None
    redis_url: str | None = None
    transfer_backend: str | None = None
    metrics_port: int | None = None


def stack_spec(cluster: ClusterFile, over: UpOverrides, log_dir: Path, restart: bool) -> StackSpec:
    """The StackSpec that runs ``cluster`` on this machine; ClusterFileError when it cannot. An instance
    of several ranks runs as its leader, which starts its other ranks on this host itself."""
    mode = over.mode or "pd"
    role_args = {
        role: settings_args(
            worker_config(cluster, role, host=_HOST, port=0, controller=_CONTROLLER, redis_url=_REDIS),
            skip=WORKER_RUNTIME_FLAGS,
        )
        for role in ("prefill", "decode")
    }
    role_args["mixed"] = role_args["decode"]  # a mixed worker mostly decodes: it takes decode's limits
    controller = controller_config(cluster, host=_HOST, port=0, redis_url=_REDIS)
    coordinator = coordinator_config(cluster, host=_HOST, controller=_CONTROLLER)
    coordinator_skip = ("host", "controller", "model_dir", "http_port", "grpc_port")
    coordinator_skip += tuple(n for n in type(coordinator).model_fields if n.startswith("ready_"))
    model_dir = over.model or Path(cluster.model.path)
    try:
        return StackSpec(
            model_dir=model_dir.resolve(),
            prefill=_pick(over.prefill, cluster.deploy_config.p_instances_num),
            decode=_pick(over.decode, cluster.deploy_config.d_instances_num),
            mode=mode,
            host=_pick(over.host, "127.0.0.1"),
            http_port=_pick(over.http_port, coordinator.http_port),
            redis_url=_pick(over.redis_url, cluster.deploy_config.redis_url),
            log_dir=log_dir,
            worker_args={"transfer-backend": over.transfer_backend} if over.transfer_backend else {},
            role_args=role_args,
            coordinator_args=settings_args(coordinator, skip=coordinator_skip),
            controller_args=settings_args(controller, skip=CONTROLLER_RUNTIME_FLAGS),
            controllers=cluster.controller.replicas,
            restart_workers=restart,
            # the coordinator's; the file's null turns every service's metrics off
            metrics_port=_pick(over.metrics_port, cluster.observability.metrics_port),
        )
    except ValueError as exc:
        raise ClusterFileError(str(exc)) from None


def _pick(flag, file_value):
    return file_value if flag is None else flag
