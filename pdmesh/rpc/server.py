"""gRPC server plumbing shared by every service: the standard health service, binding port 0 for
tests, a graceful stop on SIGTERM/SIGINT, the OpenTelemetry interceptor while tracing is on, and
mutual TLS with the identity checks while ``pdmesh.security.tls.current()`` is set."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdmesh.observability import tracing
from pdmesh.security import tls
from pdmesh.security.authz import IdentityInterceptor

log = logging.getLogger(__name__)

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]


@dataclass
class RunningServer:
    """A started gRPC server with its bound port and health servicer."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str]

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def start_server(
    register: Callable[[grpc.aio.Server], None],
    service_names: list[str],
    host: str = "127.0.0.1",
    port: int = 0,
) -> RunningServer:
    """Creates, binds (port 0: a free one) and starts a gRPC server with the health service."""
    files = tls.current()
    interceptors = list(tracing.server_interceptors())
    if files is not None:
        interceptors.append(IdentityInterceptor(files))
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if files is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", tls.grpc_server_credentials(files))
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    await server.start()
    running = RunningServer(server, bound, health_servicer, service_names)
    await running.set_serving(True)
    log.info(
        "gRPC server for %s listening on %s:%d (%s)",
        ", ".join(service_names),
        host,
        bound,
        "mutual TLS" if files else "plaintext",
    )
    return running


async def serve_until_signal(
    running: RunningServer,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    grace_s: float = 5.0,
) -> None:
    """Serves until SIGTERM or SIGINT, then reports NOT_SERVING, runs ``on_stop`` and stops."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server_done = asyncio.ensure_future(running.server.wait_for_termination())
    stop_wait = asyncio.ensure_future(stop.wait())
    await asyncio.wait({server_done, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    log.info("stopping gracefully")
    await running.set_serving(False)
    if on_stop is not None:
        await on_stop()
    await running.server.stop(grace_s)
    stop_wait.cancel()
