"""Tracing's switches: off unless asked, the sample ratio, and the KV transfer frame carrying context.

Installing a tracer provider is once per process, so what needs one runs in a child Python process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import ValidationError

from pdmesh.config import ControllerConfig, CoordinatorConfig, WorkerConfig
from pdmesh.kv.transfer import wire
from pdmesh.kv.types import KVLayout
from pdmesh.observability import tracing

pytestmark = pytest.mark.timeout(60)

OTEL_SWITCHES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_TRACES_SAMPLER",
)


@pytest.fixture
def no_otel_env(monkeypatch):
    for name in OTEL_SWITCHES:
        monkeypatch.delenv(name, raising=False)


def _layout() -> KVLayout:
    return KVLayout("m", "mha", 2, 2, 8, 16, "float32", (2, 2, 16, 2, 8))


def test_tracing_is_off_without_an_endpoint_and_adds_nothing(no_otel_env):
    assert tracing.configure("pdmesh-worker", None) is False
    assert not tracing.enabled()
    assert tracing.server_interceptors() == [] and tracing.client_interceptors() == []
    with tracing.tracer().start_as_current_span("anything") as span:
        assert not span.is_recording()  # the API's no-op span: nothing to export
        assert "trace" not in wire.hello("h:1", _layout())  # nothing written into the frame either


def test_the_standard_variables_turn_tracing_on_and_off(no_otel_env, monkeypatch):
    assert not tracing.wanted(None)
    assert tracing.wanted("http://collector:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert tracing.wanted(None)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.wanted("http://collector:4317")
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing.wanted("http://collector:4317")


def _finished(ratio: float, parent: str | None = None) -> list:
    exporter = InMemorySpanExporter()
    provider = tracing.build_provider("pdmesh-coordinator", ratio, exporter, instance_id="c-1")
    tracer = provider.get_tracer("test")
    context = TraceContextTextMapPropagator().extract({"traceparent": parent}) if parent else None
    for _ in range(20):
        with tracer.start_as_current_span("request", context=context):
            pass
    provider.shutdown()  # flushes the batch processor
    return list(exporter.get_finished_spans())


def test_sample_ratio_zero_drops_spans_and_one_keeps_them(no_otel_env):
    assert _finished(0.0) == []
    kept = _finished(1.0)
    assert len(kept) == 20
    assert kept[0].resource.attributes["service.name"] == "pdmesh-coordinator"
    assert kept[0].resource.attributes["service.instance.id"] == "c-1"


def test_a_sampled_parent_is_followed_whatever_the_ratio(no_otel_env):
    """ParentBased: a request the coordinator traced is traced on every worker it reaches."""
    sampled = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    unsampled = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"
    assert len(_finished(0.0, sampled)) == 20
    assert _finished(1.0, unsampled) == []


CHILD = """
import json
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pdmesh.kv.transfer import wire
from pdmesh.kv.types import KVLayout
from pdmesh.observability import tracing

exporter = InMemorySpanExporter()
assert tracing.configure("pdmesh-worker", None, role="decode", exporter=exporter)
tracing.set_span_attributes({"pdmesh.instance_id": "decode-7"})
layout = KVLayout("m", "mha", 2, 2, 8, 16, "float32", (2, 2, 16, 2, 8))
with tracing.tracer().start_as_current_span("kv.transfer.receive"):
    frame = json.loads(json.dumps(wire.hello("h:1", layout)))  # as it crosses the socket
with wire.pull_span(frame, "tcp"):
    pass
tracing.shutdown()
print(json.dumps([
    {"name": s.name, "trace": s.context.trace_id, "id": s.context.span_id,
     "parent": s.parent.span_id if s.parent else None, "attributes": dict(s.attributes),
     "resource": dict(s.resource.attributes)}
    for s in exporter.get_finished_spans()
]))
"""


def test_the_transfer_frame_carries_the_pullers_context_to_the_server_span():
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD)], capture_output=True, text=True, timeout=50, check=True
    )
    spans = {s["name"]: s for s in json.loads(out.stdout.strip().splitlines()[-1])}
    receive, send = spans["kv.transfer.receive"], spans["kv.transfer.send"]
    assert send["trace"] == receive["trace"] and send["parent"] == receive["id"]
    assert send["attributes"]["pdmesh.kv.backend"] == "tcp"
    assert send["attributes"]["pdmesh.instance_id"] == "decode-7"  # stamped once the id was known
    assert send["resource"]["service.name"] == "pdmesh-worker"
    assert send["resource"]["pdmesh.role"] == "decode"


@pytest.mark.parametrize("config", [ControllerConfig, CoordinatorConfig, WorkerConfig])
def test_every_service_takes_the_trace_flags_and_refuses_bad_values(config):
    required = {"controller": "c:1", "model_dir": "m", "redis_url": "redis://r"}
    fields = {k: v for k, v in required.items() if k in config.model_fields}
    assert config(**fields).otlp_traces_endpoint is None  # off by default
    assert config(**fields).trace_sample_ratio == 1.0
    ok = config(**fields, otlp_traces_endpoint="http://collector:4317", trace_sample_ratio=0.25)
    assert ok.otlp_traces_endpoint == "http://collector:4317"
    with pytest.raises(ValidationError, match="otlp_traces_endpoint"):
        config(**fields, otlp_traces_endpoint="collector:4317")
    with pytest.raises(ValidationError, match="trace_sample_ratio"):
        config(**fields, trace_sample_ratio=1.5)
