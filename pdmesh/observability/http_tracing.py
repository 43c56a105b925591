"""Server spans for the coordinator's OpenAI HTTP routes, and the ``gen_ai.*`` attributes of a request.

FastAPI traces requests itself once a tracer provider is installed (``fastapi_telemetry`` says
which and how). The route handlers and the gRPC ``Generate`` put the OpenTelemetry GenAI
semantic-convention attributes on the current (server) span with ``record_gen_ai_request`` and
``record_gen_ai_usage``.
"""

from __future__ import annotations

from pdmesh.generation import SamplingParams
from pdmesh.observability import tracing

TRACED_PREFIX = "/v1/"


def _untraced(scope) -> bool:
    return not scope.get("path", "").startswith(TRACED_PREFIX)


def fastapi_telemetry() -> dict:
    """``FastAPI(telemetry=...)``: FastAPI's own server spans (W3C ``traceparent`` accepted as the
    parent), for the ``/v1/`` routes only (probes, metrics and the dashboard poll all the time), one
    span per request (no spans per dependency, which would also take the ``gen_ai.*`` attributes);
    metrics are Prometheus' and logs the services' own."""
    return {"exclude": _untraced, "operation_spans": False, "metrics": False, "logs": False}


def record_gen_ai_request(
    operation: str, model: str, sampling: SamplingParams, prompt_ids: list[int], request_id: str
) -> None:
    """The request's GenAI attributes on the current span (nothing while tracing is off)."""
    span = tracing.current_span()
    if not span.is_recording():
        return
    span.set_attributes(
        {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": sampling.max_tokens,
            "gen_ai.request.temperature": sampling.temperature,
            "gen_ai.usage.input_tokens": len(prompt_ids),
            "gen_ai.response.id": request_id,
        }
    )


def record_gen_ai_usage(output_tokens: int, finish_reason: str | None) -> None:
    """The answer's token count and finish reason on the current span."""
    span = tracing.current_span()
    if not span.is_recording():
        return
    span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
    if finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
