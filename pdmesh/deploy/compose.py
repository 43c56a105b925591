"""docker-compose from the cluster file: Redis, the controllers, every pod of every instance, the
coordinator; health checks gate start-up (``depends_on: condition: service_healthy``) and only the
coordinator's HTTP port is published.

Each worker binds its service name, which resolves to its own container inside the compose network,
so the address it registers is one the others can reach. A pod of a multi-pod instance gets the
environment LeaderWorkerSet gives it on Kubernetes (``LWS_LEADER_ADDRESS``, ``LWS_GROUP_SIZE``,
``LWS_WORKER_INDEX``), so both deployments start ranks the same way.
"""

from __future__ import annotations

from typing import Any

from pdmesh.deploy import tls_render
from pdmesh.deploy.cluster_file import ClusterFile
from pdmesh.deploy.common import (
    ASCEND_DRIVER,
    CLUSTER_FILE_DIR,
    CLUSTER_FILE_NAME,
    COORDINATOR_GRACE_S,
    DRAIN_MARGIN_S,
    REDIS_PORT,
    ROLES,
    WORKER_COMMANDS,
    check_containers,
    device_kind,
    grpc_probe,
    http_probe,
    instance_names,
    model_mount,
)
from pdmesh.deploy.observability import check_metrics, compose_services
from pdmesh.deploy.settings import (
    COORDINATOR_GRPC_PORT,
    TLS_DIR,
    controller_config,
    coordinator_config,
    settings_argv,
    tls_flags,
    worker_config,
)
from pdmesh.deploy.tls_config import redis_url


def _healthcheck(test: list[str], start_period_s: int) -> dict[str, Any]:
    return {
        "test": ["CMD", *test],
        "interval": "5s",
        "timeout": "4s",
        "retries": 3,
        "start_period": f"{start_period_s}s",
        "start_interval": "1s",
    }


def _healthy(*names: str) -> dict[str, dict[str, str]]:
    return {name: {"condition": "service_healthy"} for name in names}


class ComposeRenderer:
    """Builds the compose document of one cluster file."""

    def __init__(self, cluster: ClusterFile, cluster_file_name: str = CLUSTER_FILE_NAME) -> None:
        check_containers(cluster)
        check_metrics(cluster)
        tls_render.check(cluster)
        self.cluster = cluster
        self.metrics_port = cluster.observability.metrics_port
        self.d = cluster.deploy_config
        self.cluster_file_name = cluster_file_name
        self.controllers = ["controller", *(f"controller-{i}" for i in range(1, cluster.controller.replicas))]
        self.controller_address = ",".join(f"{n}:{self.d.controller_port}" for n in self.controllers)
        self.redis_url = self.d.redis_url or f"redis://redis:{REDIS_PORT}/0"
        self.redis_deps = [] if self.d.redis_url else ["redis"]
        self._next_device = {"cuda": 0, "npu": 0}

    def render(self) -> dict[str, Any]:
        services: dict[str, Any] = {}
        if not self.d.redis_url:
            services["redis"] = self._redis()
        for name in self.controllers:
            services[name] = self._controller(name)
        for role in ROLES:
            for instance_id, pods in instance_names(self.cluster, role):
                for index, pod in enumerate(pods):
                    services[pod] = self._worker(role, instance_id, pod, index)
        services["coordinator"] = self._coordinator()
        services.update(compose_services(self.cluster))
        document = {"name": self.d.namespace, "services": services}
        secrets = tls_render.compose_secrets(self.cluster)
        if secrets:
            document["secrets"] = secrets
        return document

    def _secure(self, service: dict[str, Any], identity: str) -> None:
        """Mounts ``identity``'s TLS files (and the coordinator's API keys) as file secrets."""
        secrets = tls_render.compose_service_secrets(self.cluster, identity)
        if secrets:
            service["secrets"] = secrets

    def _expose(self, *ports: int) -> list[str]:
        """Container ports other services reach: the service's own and its metrics port (Prometheus
        and the coordinator's /metrics/mesh scrape it)."""
        extra = () if self.metrics_port is None else (self.metrics_port,)
        return [str(p) for p in (*ports, *extra)]

    def _base(self, command: list[str], healthcheck: dict, depends: list[str]) -> dict[str, Any]:
        service = {
            "image": self.d.image_name,
            "command": command,
            "healthcheck": healthcheck,
            "restart": "unless-stopped",
            "volumes": [f"./{self.cluster_file_name}:{CLUSTER_FILE_DIR}/{CLUSTER_FILE_NAME}:ro"],
        }
        if depends:
            service["depends_on"] = _healthy(*depends)
        return service

    def _redis(self) -> dict[str, Any]:
        command = ["redis-server", "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no"]
        return {
            "image": self.d.redis_image,
            "command": command,
            "healthcheck": _healthcheck(["redis-cli", "-p", str(REDIS_PORT), "ping"], 10),
            "restart": "unless-stopped",
            "expose": [str(REDIS_PORT)],
        }

    def _controller(self, name: str) -> dict[str, Any]:
        port = self.d.controller_port
        config = controller_config(
            self.cluster,
            host="0.0.0.0",
            port=port,
            redis_url=redis_url(self.cluster.tls_config, self.redis_url, "controller", TLS_DIR),
            advertise_address=f"{name}:{port}",
            metrics_port=self.metrics_port,
        )
        command = ["pdmesh", "controller", *settings_argv(config), *tls_flags(self.cluster, "controller")]
        probe = [*grpc_probe(f"127.0.0.1:{port}"), *tls_render.probe_flags(self.cluster, "controller")]
        service = self._base(command, _healthcheck(probe, 30), self.redis_deps)
        self._secure(service, "controller")
        service["expose"] = self._expose(port)
        service["stop_grace_period"] = "10s"
        return service

    def _worker(self, role: str, instance_id: str, pod: str, index: int) -> dict[str, Any]:
        port = self.d.worker_port
        config = worker_config(
            self.cluster,
            role,
            host=pod,
            port=port,
            controller=self.controller_address,
            redis_url=redis_url(self.cluster.tls_config, self.redis_url, "worker", TLS_DIR),
            instance_id=instance_id,
            transfer_port=self.d.worker_transfer_port,
            metrics_port=self.metrics_port,
        )
        command = ["pdmesh", WORKER_COMMANDS[role], *settings_argv(config, skip=("role",))]
        command += tls_flags(self.cluster, "worker")
        depends = [*self.redis_deps, *self.controllers]
        probe = [*grpc_probe(f"{pod}:{port}"), *tls_render.probe_flags(self.cluster, "worker")]
        service = self._base(command, _healthcheck(probe, 600), depends)
        self._secure(service, "worker")
        if index > 0:  # a follower rank serves no gRPC API of its own; the group fails as one
            del service["healthcheck"]
        service["volumes"].append(f"{model_mount(self.cluster)}:{model_mount(self.cluster)}:ro")
        service["expose"] = self._expose(port, self.d.worker_transfer_port)
        service["stop_grace_period"] = f"{int(self.cluster.controller.drain_timeout_s) + DRAIN_MARGIN_S}s"
        environment = {}
        if self.cluster.pods(role) > 1:
            environment = {
                "LWS_LEADER_ADDRESS": instance_id,
                "LWS_GROUP_SIZE": str(self.cluster.pods(role)),
                "LWS_WORKER_INDEX": str(index),
            }
        devices, device_env = self._devices(role)
        service.update(devices)
        if device_kind(self.cluster, role) == "npu":
            service["volumes"].append(f"{ASCEND_DRIVER}:{ASCEND_DRIVER}:ro")
        if environment or device_env:
            service["environment"] = {**environment, **device_env}
        return service

    def _devices(self, role: str) -> tuple[dict[str, Any], dict[str, str]]:
        """(service keys, environment) for this container's devices: consecutive indices, as compose
        runs every container on one host."""
        kind, count = device_kind(self.cluster, role), self.cluster.devices_per_pod(role)
        if kind == "cpu":
            return {}, {}
        first = self._next_device[kind]
        self._next_device[kind] += count
        ids = [str(i) for i in range(first, first + count)]
        if kind == "cuda":
            reservation = {"driver": "nvidia", "device_ids": ids, "capabilities": ["gpu"]}
            return {"deploy": {"resources": {"reservations": {"devices": [reservation]}}}}, {}
        # Ascend: the device nodes, as Ascend's container runtime would add them (the driver: a volume)
        nodes = [
            "/dev/davinci_manager",
            "/dev/devmm_svm",
            "/dev/hisi_hdc",
            *(f"/dev/davinci{i}" for i in ids),
        ]
        return {"devices": nodes}, {"ASCEND_VISIBLE_DEVICES": ",".join(ids)}

    def _coordinator(self) -> dict[str, Any]:
        grpc_port = self.cluster.coordinator.grpc_port or COORDINATOR_GRPC_PORT
        config = coordinator_config(
            self.cluster,
            host="0.0.0.0",
            controller=self.controller_address,
            grpc_port=grpc_port,
            metrics_port=self.metrics_port,
        )
        command = ["pdmesh", "coordinator", *settings_argv(config, skip=("api_key_file",))]
        command += [*tls_flags(self.cluster, "coordinator"), *tls_render.api_key_flag(self.cluster)]
        scheme = "https" if self.cluster.tls_config.http_server_tls_enable else "http"
        ready = http_probe(f"{scheme}://127.0.0.1:{config.http_port}/ready")
        service = self._base(command, _healthcheck(ready, 600), self.controllers)
        self._secure(service, "coordinator")
        service["volumes"].append(f"{model_mount(self.cluster)}:{model_mount(self.cluster)}:ro")
        service["ports"] = [f"{config.http_port}:{config.http_port}"]
        service["expose"] = self._expose(grpc_port)
        service["stop_grace_period"] = f"{COORDINATOR_GRACE_S}s"
        return service
