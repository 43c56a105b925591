"""gRPC client plumbing: channels with keepalive, a deadline on every call, and health waits."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.observability import tracing
from pdmesh.security import tls

DEFAULT_DEADLINE_S = 10.0

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def open_channel(address: str, tls_files: tls.TlsFiles | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``host:port`` with the project's options (and, while tracing is on, the
    interceptors that start client spans and put the trace context in the call's metadata).

    Mutual TLS with ``tls_files`` or else this process's ``tls.current()``; plaintext when neither is
    set. The files are read now: a channel keeps its certificate until it is reopened. The server's
    certificate must name ``host`` (an IP address or DNS name in its SANs)."""
    interceptors = tracing.client_interceptors() or None
    files = tls_files or tls.current()
    if files is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)
    credentials = tls.grpc_channel_credentials(files)
    return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS, interceptors=interceptors)


async def check_health(channel: grpc.aio.Channel, service: str = "", timeout_s: float = 2.0) -> bool:
    """True when the peer's standard health service answers SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.aio.AioRpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def wait_healthy(
    address: str, timeout_s: float = 30.0, service: str = "", tls_files: tls.TlsFiles | None = None
) -> None:
    """Waits until the server at ``address`` reports SERVING; raises TimeoutError naming it."""
    deadline = time.monotonic() + timeout_s
    async with open_channel(address, tls_files) as channel:
        while time.monotonic() < deadline:
            if await check_health(channel, service, timeout_s=1.0):
                return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{address} did not become healthy within {timeout_s:.0f}s")
