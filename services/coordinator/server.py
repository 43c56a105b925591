"""Assembles the coordinator: cluster watcher, router, mesh backend, HTTP front and gRPC front."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from pathlib import Path

import uvicorn

from pdmesh.cluster import Role
from pdmesh.config import CoordinatorConfig
from pdmesh.rpc.controller_client import ClusterWatcher
from pdmesh.rpc.server import RunningServer, start_server
from pdmesh.tokenizer import Tokenizer
from pdmesh.v1 import coordinator_pb2_grpc
from services.coordinator.grpc_front import CoordinatorServicer
from services.coordinator.http_app import create_app
from services.coordinator.mesh import MeshBackend
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

    def install_signal_handlers(self) -> None:  # older uvicorn releases
        return None


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

    async def start(self) -> None:
        tokenizer = Tokenizer.from_dir(self.model_dir)
        max_model_len = read_max_model_len(self.model_dir)
        await self.watcher.start()
        servicer = CoordinatorServicer(self.backend, tokenizer, self.model_name, max_model_len)
        self.grpc = await start_server(
            lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, s),
            ["pdmesh.v1.Coordinator"],
            self.config.host,
            self.config.grpc_port,
        )
        app = create_app(self.backend, self.model_name, tokenizer, max_model_len, self.readiness.check)
        await self._start_http(app)
        log.info(
            "coordinator serving HTTP on %s:%d, gRPC on %d", self.config.host, self.http_port, self.grpc.port
        )

    async def _start_http(self, app) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.http_port))
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", timeout_graceful_shutdown=HTTP_GRACE_S
        )
        self.http = _QuietSignalsServer(config)
        self._http_task = asyncio.ensure_future(self.http.serve(sockets=[sock]))
        while not self.http.started:
            if self._http_task.done():
                self._http_task.result()
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.http is not None:
            self.http.should_exit = True
            try:
                await asyncio.wait_for(self._http_task, timeout=HTTP_STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("the HTTP server did not stop within %gs; cancelled it", HTTP_STOP_TIMEOUT_S)
            except Exception:
                log.warning("the HTTP server failed while stopping", exc_info=True)
        if self.grpc is not None:
            await self.grpc.stop(grace_s=2.0)
        await self.watcher.stop()
        await self.backend.close()


async def create_coordinator(config: CoordinatorConfig) -> Coordinator:
    coordinator = Coordinator(config)
    await coordinator.start()
    return coordinator
