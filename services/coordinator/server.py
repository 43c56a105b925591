"""Assembles the coordinator: cluster watcher, router, mesh backend, HTTP front and gRPC front."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from pathlib import Path

import uvicorn

from pdmesh.config import CoordinatorConfig
from pdmesh.membership import Role
from pdmesh.rpc.controller_client import ClusterWatcher
from pdmesh.rpc.server import RunningServer, start_server
from pdmesh.tokenizer import Tokenizer
from pdmesh.v1 import coordinator_pb2_grpc
from services.coordinator.api_keys import KeyLimits, KeyRing
from services.coordinator.dashboard import install_dashboard
from services.coordinator.grpc_front import CoordinatorServicer
from services.coordinator.http_app import create_app
from services.coordinator.https import https_context
from services.coordinator.mesh import MeshBackend
from services.coordinator.metrics_http import create_metrics_app
from services.coordinator.readiness import Readiness
from services.coordinator.routing import Router

log = logging.getLogger(__name__)

HTTP_GRACE_S = 5  # open requests get this long to finish when the coordinator stops
HTTP_STOP_TIMEOUT_S = HTTP_GRACE_S + 5  # then uvicorn closes them; past this, it is stuck


class _QuietSignalsServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the coordinator stops everything in one place."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def read_max_model_len(model_dir: Path) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings", 2048))


class Coordinator:
    """A running coordinator; ``stop()`` ends its servers and its watch on the controller."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.model_dir = Path(config.model_dir)
        self.model_name = config.model_name or self.model_dir.name
        self.watcher = ClusterWatcher(config.controller)
        self.router = Router(
            lambda: self.watcher.view,
            prefill_policy=config.prefill_policy,
            decode_policy=config.decode_policy,
            block_size=config.block_size,
            imbalance=config.cache_imbalance,
        )
        self.backend = MeshBackend(self.router, config)
        wanted = {
            Role.PREFILL: config.ready_prefill_instances,
            Role.DECODE: config.ready_decode_instances,
            Role.MIXED: config.ready_mixed_instances,
        }
        self.readiness = Readiness(lambda: self.watcher.view, self.backend.ready, wanted)
        self.watcher.add_listener(self.readiness.check)
        self.grpc: RunningServer | None = None
        self.http: _QuietSignalsServer | None = None
        self.http_port = 0
        self._http_task: asyncio.Task | None = None
        self.metrics: _QuietSignalsServer | None = None  # the metrics port (--metrics-port)
        self.metrics_address = ""
        self._metrics_task: asyncio.Task | None = None

    async def start(self) -> None:
        cfg = self.config
        ring = self._key_ring()  # bad key or HTTPS files stop the start before anything listens
        tls = https_context(cfg.http_tls_cert, cfg.http_tls_key) if cfg.http_tls_cert else None
        tokenizer = Tokenizer.from_dir(self.model_dir)
        max_model_len = read_max_model_len(self.model_dir)
        await self.watcher.start()
        servicer = CoordinatorServicer(self.backend, tokenizer, self.model_name, max_model_len)
        servicer.api_keys = ring if ring.enabled else None
        self.grpc = await start_server(
            lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, s),
            ["pdmesh.v1.Coordinator"],
            self.config.host,
            self.config.grpc_port,
        )
        limits = KeyLimits(self.config.api_key_max_rps, self.config.api_key_max_concurrency)
        keys = (ring, limits) if ring.enabled else None
        app = create_app(self.backend, self.model_name, tokenizer, max_model_len, self.readiness.check, keys)
        install_dashboard(app, self.watcher)
        await self._start_http(app, tls)
        if self.config.metrics_port is not None:
            self.metrics, self._metrics_task, port = await _serve(
                create_metrics_app(self.watcher), self.config.host, self.config.metrics_port
            )
            self.metrics_address = f"{self.config.host}:{port}"
            log.info("metrics on http://%s/metrics (the whole mesh: /metrics/mesh)", self.metrics_address)
        log.info(
            "coordinator serving %s on %s:%d, gRPC on %d%s",
            "HTTPS" if self.config.http_tls_cert else "HTTP",
            self.config.host,
            self.http_port,
            self.grpc.port,
            "; API keys required" if ring.enabled else "",
        )

    def _key_ring(self) -> KeyRing:
        keys = [k.get_secret_value() for k in self.config.api_keys or ()]
        return KeyRing(keys, self.config.api_key_file)

    async def _start_http(self, app, tls: ssl.SSLContext | None = None) -> None:
        self.http, self._http_task, self.http_port = await _serve(
            app, self.config.host, self.config.http_port, tls
        )

    async def stop(self) -> None:
        if self.http is not None:
            await _stop_serving(self.http, self._http_task, "HTTP")
        if self.metrics is not None:
            await _stop_serving(self.metrics, self._metrics_task, "metrics")
        if self.grpc is not None:
            await self.grpc.stop(grace_s=2.0)
        await self.watcher.stop()
        await self.backend.close()


async def _serve(
    app, host: str, port: int, tls: ssl.SSLContext | None = None
) -> tuple[_QuietSignalsServer, asyncio.Task, int]:
    """Serves ``app`` with uvicorn on ``host:port`` (0: a free port), over ``tls`` when given;
    returns once it listens."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=HTTP_GRACE_S,
        ssl_context_factory=None if tls is None else (lambda _config, _default: tls),
    )
    server = _QuietSignalsServer(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    return server, task, sock.getsockname()[1]


async def _stop_serving(server: _QuietSignalsServer, task: asyncio.Task, what: str) -> None:
    server.should_exit = True
    try:
        await asyncio.wait_for(task, timeout=HTTP_STOP_TIMEOUT_S)
    except TimeoutError:
        log.warning("the %s server did not stop within %gs; cancelled it", what, HTTP_STOP_TIMEOUT_S)
    except Exception:
        log.warning("the %s server failed while stopping", what, exc_info=True)


async def create_coordinator(config: CoordinatorConfig) -> Coordinator:
    coordinator = Coordinator(config)
    await coordinator.start()
    return coordinator
