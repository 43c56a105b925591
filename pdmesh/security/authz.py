"""Who may call what over gRPC: one server interceptor that checks the calling peer's certificate
identity (its subject CN) against a table of methods, and its serial against the CRL.

It is installed by ``pdmesh.rpc.server.start_server`` only while TLS is on; the handshake has then
already refused any peer without a certificate from the CA, so a call reaching here has an identity.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc

from pdmesh.security import tls

log = logging.getLogger(__name__)

ANY = None  # any certificate from the CA
INTERNAL = frozenset({"coordinator", "controller", "worker"})

# Per service (the proto's full name): the default rule and per-method overrides.
SERVICE_RULES: dict[str, frozenset[str] | None] = {
    "grpc.health.v1.Health": ANY,
    "pdmesh.v1.Coordinator": ANY,  # Generate: the API of a client holding a certificate from the CA
    "pdmesh.v1.Worker": INTERNAL,
    "pdmesh.v1.Controller": frozenset({"admin"}),
}
METHOD_RULES: dict[str, frozenset[str] | None] = {
    "/pdmesh.v1.Controller/Register": frozenset({"worker"}),
    "/pdmesh.v1.Controller/Heartbeat": frozenset({"worker"}),
    "/pdmesh.v1.Controller/Deregister": frozenset({"worker"}),
    # a worker pod's preStop hook drains its own instance before the pod stops (Kubernetes)
    "/pdmesh.v1.Controller/Drain": frozenset({"admin", "worker"}),
    "/pdmesh.v1.Controller/ListInstances": INTERNAL | {"admin"},
    "/pdmesh.v1.Controller/WatchCluster": INTERNAL | {"admin"},
    # pdmesh ctl experts --rebalance: an operator's call to a worker
    "/pdmesh.v1.Worker/RebalanceExperts": INTERNAL | {"admin"},
}


class UnknownMethod(LookupError):
    """A method of a service the table does not know: refused rather than open by accident."""


def allowed_identities(method: str) -> frozenset[str] | None:
    """The identities that may call ``method`` ("/package.Service/Method"); None: any from the CA."""
    if method in METHOD_RULES:
        return METHOD_RULES[method]
    service = method.lstrip("/").split("/", 1)[0]
    if service not in SERVICE_RULES:
        raise UnknownMethod(method)
    return SERVICE_RULES[service]


class IdentityInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call whose peer certificate is revoked (UNAUTHENTICATED) or whose identity may not
    call the method (PERMISSION_DENIED naming both)."""

    def __init__(self, files: tls.TlsFiles) -> None:
        self.revocations = tls.RevocationList(files) if files.crl else None

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        try:
            allowed = allowed_identities(details.method)
        except UnknownMethod:
            allowed = frozenset()
        return _wrap(handler, lambda context: self._check(context, details.method, allowed))

    async def _check(
        self, context: grpc.aio.ServicerContext, method: str, allowed: frozenset[str] | None
    ) -> None:
        identity = tls.peer_identity(context)
        if identity is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method} needs a client certificate")
        if self.revocations is not None:
            pem = tls.peer_certificate(context)
            if pem is None or self.revocations.is_revoked(pem):
                log.warning("refused %s: the certificate of %r is revoked", method, identity)
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED, f"the certificate of {identity!r} is revoked"
                )
        if allowed is not None and identity not in allowed:
            log.warning("refused %s to %r", method, identity)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"identity {identity!r} may not call {method} (allowed: {', '.join(sorted(allowed)) or 'none'})",
            )


def _wrap(handler: grpc.RpcMethodHandler, check: Callable[[Any], Any]) -> grpc.RpcMethodHandler:
    """The same handler with ``check(context)`` awaited before the behaviour runs."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _checked(handler.unary_unary, check), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _checked(handler.unary_stream, check), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _checked(handler.stream_unary, check), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        _checked(handler.stream_stream, check), handler.request_deserializer, handler.response_serializer
    )


def _checked(behavior: Callable[..., Any], check: Callable[[Any], Any]) -> Callable[..., Any]:
    # grpc.aio treats an async generator function as a streaming response and anything else as a
    # coroutine (which may write with context.write): the wrapper must keep that kind.
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            async for item in behavior(request, context):
                yield item

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(context)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return call
