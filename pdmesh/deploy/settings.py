"""Each service's own settings, built from the cluster file, and the command-line flags for them.

A section of the cluster file holds a service's tunables; the deployment adds what only it knows
(addresses, ports, instance ids, readiness counts). The result is the service's pydantic settings
object, validated as the service itself would validate it, and rendered as the flags it takes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from pdmesh.config import ControllerConfig, CoordinatorConfig, WorkerConfig
from pdmesh.deploy.cluster_file import ClusterFile, ClusterFileError, describe_errors
from pdmesh.deploy.tls_config import CONTAINER_TLS_DIR, https_flags, service_flags

TLS_DIR = CONTAINER_TLS_DIR

COORDINATOR_GRPC_PORT = 50050  # in a container: a fixed port, since the file's default 0 means "any"
CONTROLLER_RUNTIME_FLAGS = ("host", "port", "redis_url", "advertise_address")
WORKER_RUNTIME_FLAGS = ("host", "port", "instance_id", "controller", "redis_url", "model_dir", "role")


def _build(model: type[BaseModel], values: dict[str, Any], what: str) -> BaseModel:
    try:
        return model(**values)
    except ValidationError as exc:
        raise ClusterFileError(f"{what}: {describe_errors(exc, model)}") from None


def controller_config(
    cluster: ClusterFile,
    *,
    host: str,
    port: int,
    redis_url: str,
    advertise_address: str | None = None,
    metrics_port: int | None = None,
) -> ControllerConfig:
    values = cluster.controller.model_dump(exclude={"replicas"})
    values.update(host=host, port=port, redis_url=redis_url, advertise_address=advertise_address)
    values.update(metrics_port=metrics_port)
    return _build(ControllerConfig, values, "controller")


def coordinator_config(
    cluster: ClusterFile,
    *,
    host: str,
    controller: str,
    http_port: int | None = None,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
) -> CoordinatorConfig:
    """Readiness counts are the file's instance counts: the coordinator turns ready (and logs
    ``pdmesh coordinator is ready``) once every prefill and decode instance is healthy."""
    values = cluster.coordinator.model_dump()
    values.update(
        host=host,
        controller=controller,
        model_dir=cluster.model.path,
        model_name=cluster.model.name,
        block_size=cluster.prefill.block_size,
        ready_prefill_instances=cluster.deploy_config.p_instances_num,
        ready_decode_instances=cluster.deploy_config.d_instances_num,
        metrics_port=metrics_port,
    )
    if http_port is not None:
        values["http_port"] = http_port
    if grpc_port is not None:
        values["grpc_port"] = grpc_port
    return _build(CoordinatorConfig, values, "coordinator")


def worker_config(
    cluster: ClusterFile,
    role: str,
    *,
    host: str,
    port: int,
    controller: str,
    redis_url: str,
    instance_id: str | None = None,
    transfer_port: int = 0,
    metrics_port: int | None = None,
) -> WorkerConfig:
    """A worker of ``role``; the layout (tp, dp, moe_ep, moe_tp) and limits come from its section."""
    values = cluster.server(role).model_dump()
    values.update(
        role=role,
        host=host,
        port=port,
        controller=controller,
        redis_url=redis_url,
        model_dir=cluster.model.path,
        instance_id=instance_id,
        transfer_port=transfer_port,
        metrics_port=metrics_port,
    )
    tls = cluster.tls_config
    if tls.management_tls_enable and tls.kv_transfer_tls_enable is False:
        values["kv_transfer_security"] = "secret"
    return _build(WorkerConfig, values, role)


def settings_args(config: BaseModel, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """``{flag-name: value}`` for every setting that differs from the service's default (required
    ones and ports always), as ``pdmesh <service> --flag-name value`` takes them."""
    args = {}
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        default = not field.is_required() and value == field.default and not name.endswith("port")
        if name in skip or value is None or default:
            continue
        args[name.replace("_", "-")] = str(value)
    return args


def settings_argv(config: BaseModel, skip: tuple[str, ...] = ()) -> list[str]:
    """The same as a list of command-line arguments."""
    argv = []
    for flag, value in settings_args(config, skip).items():
        argv += [f"--{flag}", value]
    return argv


def tls_flags(cluster: ClusterFile, service: str) -> list[str]:
    """A container's ``--tls-*`` flags (and the coordinator's ``--http-tls-*``) from ``tls_config``,
    with the files where the renders mount them."""
    flags = service_flags(cluster.tls_config, service, TLS_DIR)
    if service == "coordinator":
        flags.update(https_flags(cluster.tls_config, TLS_DIR))
    return [a for flag, value in flags.items() for a in (f"--{flag}", value)]
