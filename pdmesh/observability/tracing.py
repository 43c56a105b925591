"""OpenTelemetry traces for every service: off by default, OTLP over gRPC when turned on.

``configure(service, endpoint, sample_ratio, role=..., instance_id=...)`` runs once at a service's
start. Tracing is on when an endpoint is given (``--otlp-traces-endpoint``) or the standard
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, unless
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. Off, nothing is installed: the API's
no-op tracer answers every span call, gRPC servers and channels get no interceptors and no context is
written into any message.

On, spans go through a ``BatchSpanProcessor`` to an ``OTLPSpanExporter`` (the ``OTEL_BSP_*`` and
``OTEL_EXPORTER_OTLP_*`` variables tune both); ``shutdown()`` flushes them when the service stops.
Sampling is ``ParentBased(TraceIdRatioBased(ratio))``: a request the coordinator sampled is traced on
every worker it touches. With the ratio left at 1.0, ``OTEL_TRACES_SAMPLER`` (and ``_ARG``) choose the
sampler instead. Context travels as W3C trace context (``traceparent``) in gRPC metadata, HTTP
headers and the KV transfer's control frames (``inject``/``extract``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Iterator, Mapping
from typing import TypeVar

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

log = logging.getLogger(__name__)
T = TypeVar("T")

TRACER_NAME = "pdmesh"
# Polled every second or so by every worker and the controller: spans for them would drown the
# requests' traces (and cost an export each).
UNTRACED_METHODS = ("/grpc.health.v1.Health/", "/pdmesh.v1.Controller/Heartbeat")
SHUTDOWN_FLUSH_MS = 5000

_provider = None  # the SDK TracerProvider this process installed (None: tracing is off)
_ending: set[asyncio.Task] = set()  # stream spans being ended (the loop holds tasks weakly)
_span_attributes: dict[str, str] = {}  # stamped on every span this process starts (set_span_attributes)


def wanted(endpoint: str | None) -> bool:
    """Whether tracing should be on, from the flag and the standard OTEL_* variables."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(
        endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def enabled() -> bool:
    """True once ``configure`` turned tracing on in this process."""
    return _provider is not None


def _sampler(ratio: float):
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    if ratio >= 1.0 and os.environ.get("OTEL_TRACES_SAMPLER"):
        return None  # the SDK reads OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG
    return ParentBased(TraceIdRatioBased(ratio))


def _stamp_attributes_processor():
    """A span processor that puts this process's current attributes (instance id, role) on each span:
    a worker learns its instance id after it bound its port, and its role can flip."""
    from opentelemetry.sdk.trace import SpanProcessor

    class StampAttributes(SpanProcessor):
        def on_start(self, span, parent_context=None) -> None:
            if _span_attributes:
                span.set_attributes(_span_attributes)

    return StampAttributes()


def build_provider(
    service: str,
    sample_ratio: float,
    exporter,
    *,
    role: str | None = None,
    instance_id: str | None = None,
):
    """An SDK ``TracerProvider`` exporting to ``exporter`` through a batch processor (not installed)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {"pdmesh.service": service.removeprefix("pdmesh-")}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service
    attributes["service.instance.id"] = instance_id or f"{socket.gethostname()}-{os.getpid()}"
    if role:
        attributes["pdmesh.role"] = role
    provider = TracerProvider(resource=Resource.create(attributes), sampler=_sampler(sample_ratio))
    provider.add_span_processor(_stamp_attributes_processor())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def configure(
    service: str,
    endpoint: str | None,
    sample_ratio: float = 1.0,
    *,
    role: str | None = None,
    instance_id: str | None = None,
    exporter=None,
) -> bool:
    """Turns tracing on for this process when wanted (see the module docstring); True when on.

    ``exporter`` replaces the OTLP exporter (and turns tracing on whatever the flag and variables).
    """
    global _provider
    if _provider is not None:
        return True
    if exporter is None and not wanted(endpoint):
        return False
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint)  # None: from OTEL_EXPORTER_OTLP_*
    provider = build_provider(service, sample_ratio, exporter, role=role, instance_id=instance_id)
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info(
        "traces to %s (service %s, sample ratio %g)",
        endpoint or "the OTEL_EXPORTER_OTLP_* endpoint",
        service,
        sample_ratio,
    )
    return True


def set_span_attributes(attributes: Mapping[str, str]) -> None:
    """Attributes every span this process starts from now on carries (``{"pdmesh.instance_id": ...}``)."""
    _span_attributes.update(attributes)


def shutdown() -> None:
    """Exports the spans still buffered and stops the exporter (a service's last step)."""
    global _provider
    provider, _provider = _provider, None
    if provider is None:
        return
    try:
        provider.force_flush(SHUTDOWN_FLUSH_MS)
        provider.shutdown()
    except Exception as exc:  # noqa: BLE001 - stopping: a collector that is away must not stop the stop
        log.warning("flushing traces failed: %r", exc)


def tracer() -> trace.Tracer:
    """pdmesh's tracer (the no-op tracer while tracing is off)."""
    return trace.get_tracer(TRACER_NAME)


def _traced_method(details) -> bool:
    method = getattr(details, "method", "")
    if isinstance(method, bytes):
        method = method.decode()
    return not method.startswith(UNTRACED_METHODS)


def server_interceptors() -> list:
    """The OTel gRPC interceptor for a ``grpc.aio`` server while tracing is on, else none."""
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=_traced_method)]


def client_interceptors() -> list:
    """Interceptors for a ``grpc.aio`` channel while tracing is on (else none): a CLIENT span per call,
    its context in the call's metadata. Unary calls use the OTel instrumentation's interceptor; its
    response-stream one ends its span only when the stream is read to the end, so a stream the caller
    cancels once it has what it needs (Decode, the cluster watch) would never end its span: streams
    use ``_StreamSpans``, which ends it when the call is done, however."""
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    unary = [
        i
        for i in aio_client_interceptors(filter_=_traced_method)
        if isinstance(i, grpc.aio.UnaryUnaryClientInterceptor)
    ]
    return [*unary, _StreamSpans()]


class _MetadataSetter:
    def set(self, carrier, key: str, value: str) -> None:
        carrier[key] = value


class _StreamSpans(grpc.aio.UnaryStreamClientInterceptor):
    """A CLIENT span per response-streaming call, ended (with the call's status) when the call is done."""

    async def intercept_unary_stream(self, continuation, details, request):
        if not _traced_method(details):
            return await continuation(details, request)
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        service, _, name = method.strip("/").partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        span = tracer().start_span(method, kind=SpanKind.CLIENT, attributes=attributes)
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        propagate.inject(metadata, context=trace.set_span_in_context(span), setter=_MetadataSetter())
        details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        try:
            call = await continuation(details, request)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            span.end()
            raise
        call.add_done_callback(lambda done: _end_call_span(span, done))
        return call


def _end_call_span(span: Span, call) -> None:
    """Ends a stream's span once its call is done; its status needs an await (``call.code()``)."""

    async def finish() -> None:
        try:
            code = grpc.StatusCode.CANCELLED if call.cancelled() else await call.code()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                span.set_status(Status(StatusCode.ERROR, code.name))
        finally:
            span.end()

    task = asyncio.ensure_future(finish())
    _ending.add(task)
    task.add_done_callback(_ending.discard)


def inject(carrier: dict) -> dict:
    """Writes the current trace context (``traceparent``) into ``carrier``; nothing while tracing is off."""
    if enabled():
        propagate.inject(carrier)
    return carrier


@contextlib.contextmanager
def remote_span(
    name: str, carrier: Mapping[str, str] | None, attributes: Mapping | None = None
) -> Iterator[Span]:
    """A server span whose parent is the context in ``carrier`` (a message's ``traceparent``)."""
    if not enabled():
        yield trace.INVALID_SPAN
        return
    parent = propagate.extract(dict(carrier or {}))
    with tracer().start_as_current_span(
        name, context=parent, kind=SpanKind.SERVER, attributes=attributes
    ) as span:
        yield span


def current_span() -> Span:
    return trace.get_current_span()


async def traced(
    name: str, awaitable: Awaitable[T], attributes: Mapping | None = None, kind: SpanKind = SpanKind.INTERNAL
) -> T:
    """Awaits ``awaitable`` inside a span (a failure is recorded on it and raised)."""
    with tracer().start_as_current_span(name, kind=kind, attributes=attributes):
        return await awaitable


def _interval(name: str, start_ns: int, end_ns: int, attributes: Mapping | None = None) -> None:
    span = tracer().start_span(name, start_time=start_ns, attributes=attributes)
    span.end(end_time=max(start_ns, end_ns))


class EnginePhases:
    """Spans of one request's run in the engine, from the outputs' times: waiting for a step
    (``queue``), the step that produced the first output (``first``) and, when named, the steps after
    it up to the finish (``rest``). Children of the current span when created."""

    def __init__(self, queue: str, first: str, rest: str | None = None) -> None:
        self.names = (queue, first, rest)
        self.submitted_ns = time.time_ns()
        self.first_ns: int | None = None
        self.tokens = 0

    def observe(self, output) -> None:
        """Called with each ``TokenOutput`` of the request, in order."""
        if not enabled():
            return
        now = time.time_ns()
        self.tokens += len(output.token_ids)
        queue, first, rest = self.names
        if self.first_ns is None:
            step = output.step_started_ns
            step = step if self.submitted_ns <= step <= now else self.submitted_ns
            _interval(queue, self.submitted_ns, step)
            _interval(first, step, now)
            self.first_ns = now
        elif output.finished and rest is not None:
            reason = output.finish_reason.value if output.finish_reason else ""
            attributes = {"pdmesh.finish_reason": reason, "pdmesh.output_tokens": self.tokens}
            _interval(rest, self.first_ns, now, attributes)
