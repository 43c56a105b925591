"""``pdmesh up --config``: the cluster file as a local stack (``pdmesh.launcher.StackSpec``).

The local stack picks free ports and its own instance ids, so only the services' tunables come from
the file; flags given on the command line override the file's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pdmesh import launcher_tls
from pdmesh.deploy import tls_config
from pdmesh.deploy.cluster_file import ClusterFile, ClusterFileError
from pdmesh.deploy.settings import (
    CONTROLLER_RUNTIME_FLAGS,
    WORKER_RUNTIME_FLAGS,
    controller_config,
    coordinator_config,
    settings_args,
    worker_config,
)
from pdmesh.deploy.tls_config import TlsConfig
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
    coordinator_skip += ("api_key_file",)  # a path: resolved here, the services run elsewhere
    model_dir = over.model or Path(cluster.model.path)
    tls_dir = local_tls_dir(cluster)
    redis_url = _pick(over.redis_url, cluster.deploy_config.redis_url)
    if redis_url is not None:
        redis_url = tls_config.redis_url(cluster.tls_config, redis_url, "worker")
    api_key_file = cluster.coordinator.api_key_file
    try:
        return StackSpec(
            model_dir=model_dir.resolve(),
            prefill=_pick(over.prefill, cluster.deploy_config.p_instances_num),
            decode=_pick(over.decode, cluster.deploy_config.d_instances_num),
            mode=mode,
            host=_pick(over.host, "127.0.0.1"),
            http_port=_pick(over.http_port, coordinator.http_port),
            redis_url=redis_url,
            log_dir=log_dir,
            worker_args={"transfer-backend": over.transfer_backend} if over.transfer_backend else {},
            role_args=role_args,
            coordinator_args=settings_args(coordinator, skip=coordinator_skip),
            controller_args=settings_args(controller, skip=CONTROLLER_RUNTIME_FLAGS),
            controllers=cluster.controller.replicas,
            restart_workers=restart,
            # the coordinator's; the file's null turns every service's metrics off
            metrics_port=_pick(over.metrics_port, cluster.observability.metrics_port),
            tls_dir=tls_dir,
            api_key_file=None if api_key_file is None else Path(api_key_file).resolve(),
        )
    except ValueError as exc:
        raise ClusterFileError(str(exc)) from None


def local_tls_dir(cluster: ClusterFile) -> Path | None:
    """The certificate directory of ``tls_config`` for the local stack, which runs TLS on every link
    or none, with ``pdmesh certs``' layout (the launcher checks health as ``admin``); ClusterFileError
    naming the key when the files are missing or a key is readable by others."""
    tls = cluster.tls_config
    if not tls.enabled:
        return None
    if tls.management_tls_enable != tls.http_server_tls_enable:
        raise ClusterFileError(
            "tls_config: the local stack runs TLS on every link or none: set management_tls_enable "
            "and http_server_tls_enable alike (the renders take them apart)"
        )
    given = [f"tls_config.{k}" for k in ("ca_cert", "tls_crl") if getattr(tls, k)]
    given += [f"tls_config.{k}" for k in TlsConfig.model_fields if k.endswith("_items") and getattr(tls, k)]
    if tls.cert_dir is None or given:
        raise ClusterFileError(
            f"{(given or ['tls_config'])[0]}: the local stack takes one cert_dir "
            "(`pdmesh certs --out DIR`: ca.pem and each identity's .pem/.key, admin's too)"
        )
    try:
        tls_config.check_files(tls)
    except ValueError as exc:
        raise ClusterFileError(str(exc)) from None
    try:
        launcher_tls.check_files(Path(tls.cert_dir), launcher_tls.LAUNCHER_IDENTITY)
    except ValueError as exc:
        raise ClusterFileError(f"tls_config.cert_dir: {exc} (the launcher checks health as admin)") from None
    return Path(tls.cert_dir)


def _pick(flag, file_value):
    return file_value if flag is None else flag
