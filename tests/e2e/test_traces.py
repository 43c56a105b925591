"""Traces end to end: a stack whose every service exports OTLP/gRPC to a real collector in this process.

One request makes one trace: the coordinator's HTTP span (a child of the client's ``traceparent``)
with its ``gen_ai.*`` attributes, the routing decisions, the Prefill call into the prefill worker
(queue, compute, handle registration), the KV transfer on both sides (the prefill side's span a child
of the decode side's, through the transfer's control frame) and the Decode call into the decode
worker (claim, pull, first step, finish). The controller is not on a request's path; its spans are
those of the calls it serves (a worker's Register, the coordinator's watch), linked to their callers'.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from pdmesh.launcher import LocalStack
from pdmesh.rpc.client import open_channel
from pdmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from tests.e2e.conftest import start_stack

pytestmark = pytest.mark.timeout(180)

# Spans leave a service at the latest one batch delay (OTEL_BSP_SCHEDULE_DELAY, 5 s by default) after
# they end; twice that and a margin for a loaded machine.
ARRIVAL_S = 20.0


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span it is sent, flattened to dicts."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self._lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        {
                            "service": resource.get("service.name"),
                            "resource": resource,
                            "name": span.name,
                            "kind": span.kind,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                        }
                    )
        with self._lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def find(self, predicate: Callable[[dict], bool]) -> list[dict]:
        with self._lock:
            return [s for s in self.spans if predicate(s)]

    def wait_for(self, predicate: Callable[[dict], bool], what: str, timeout_s: float = ARRIVAL_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.find(predicate)
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no span {what} within {timeout_s}s"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, str]]:
    servicer = Collector()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"http://127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="module")
def traced_stack(tiny_qwen3, tmp_path_factory, collector) -> Iterator[LocalStack]:
    _, endpoint = collector
    traces = {"otlp-traces-endpoint": endpoint}
    stack = start_stack(
        tiny_qwen3,
        tmp_path_factory,
        prefill=1,
        decode=1,
        mode="pd",
        worker_args=traces,
        coordinator_args=traces,
        controller_args=traces,
    )
    try:
        yield stack
    finally:
        stack.stop()


def _in(trace_id: str, name: str, service: str = "", parent: str = "") -> Callable[[dict], bool]:
    def match(span: dict) -> bool:
        return (
            span["trace_id"] == trace_id
            and span["name"] == name
            and (not service or span["service"] == service)
            and (not parent or span["parent"] == parent)
        )

    return match


def test_one_request_is_one_trace_across_coordinator_prefill_transfer_and_decode(traced_stack, collector):
    spans, _ = collector
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    response = httpx.post(
        f"{traced_stack.base_url}/v1/completions",
        json={"prompt": "the mesh traces this request", "max_tokens": 6, "temperature": 0},
        headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    usage, choice = response.json()["usage"], response.json()["choices"][0]

    http = spans.wait_for(_in(trace_id, "POST /v1/completions", "pdmesh-coordinator"), "for the HTTP request")
    assert http["parent"] == client_span  # the client's traceparent is the parent
    attributes = http["attributes"]
    assert attributes["gen_ai.request.model"] == traced_stack.spec.model_dir.name
    assert attributes["gen_ai.request.max_tokens"] == 6
    assert attributes["gen_ai.request.temperature"] == 0.0
    assert attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attributes["gen_ai.response.finish_reasons"] == [choice["finish_reason"]]
    assert attributes["http.response.status_code"] == 200

    routes = {
        s["attributes"]["pdmesh.route.role"]: s["attributes"]["pdmesh.route.instance_id"]
        for s in [
            spans.wait_for(
                lambda s, role=role: (
                    _in(trace_id, "route", "pdmesh-coordinator", http["span_id"])(s)
                    and s["attributes"].get("pdmesh.route.role") == role
                ),
                f"routing to {role}",
            )
            for role in ("prefill", "decode")
        ]
    }
    assert routes == {"prefill": "prefill-0", "decode": "decode-0"}

    # The prefill worker: its Prefill server span is the child of the coordinator's client span.
    call = spans.wait_for(
        _in(trace_id, "/pdmesh.v1.Worker/Prefill", "pdmesh-coordinator", http["span_id"]),
        "coordinator's Prefill call under the HTTP span",
    )
    served = spans.wait_for(
        _in(trace_id, "/pdmesh.v1.Worker/Prefill", "pdmesh-worker", call["span_id"]),
        "prefill worker's Prefill under the call",
    )
    assert served["attributes"]["pdmesh.instance_id"] == "prefill-0"
    for name in ("prefill.queue", "prefill.compute", "kv.register"):
        spans.wait_for(_in(trace_id, name, "pdmesh-worker", served["span_id"]), f"{name} under Prefill")

    # The decode worker: claim, pull (the transfer's receiving side), first step and finish.
    call = spans.wait_for(
        _in(trace_id, "/pdmesh.v1.Worker/Decode", "pdmesh-coordinator", http["span_id"]),
        "coordinator's Decode call under the HTTP span",
    )
    decode = spans.wait_for(
        _in(trace_id, "/pdmesh.v1.Worker/Decode", "pdmesh-worker", call["span_id"]),
        "decode worker's Decode under the call",
    )
    assert decode["attributes"]["pdmesh.instance_id"] == "decode-0"
    for name in ("kv.claim", "decode.queue", "decode.first_step", "decode.finish"):
        spans.wait_for(_in(trace_id, name, "pdmesh-worker", decode["span_id"]), f"{name} under Decode")
    finish = spans.find(_in(trace_id, "decode.finish"))[0]["attributes"]
    assert finish["pdmesh.finish_reason"] == choice["finish_reason"]
    receive = spans.wait_for(
        _in(trace_id, "kv.transfer.receive", "pdmesh-worker", decode["span_id"]),
        "kv.transfer.receive under Decode",
    )
    # The sending side, on the prefill worker, is parented through the transfer's control frame.
    send = spans.wait_for(
        _in(trace_id, "kv.transfer.send", "pdmesh-worker", receive["span_id"]),
        "kv.transfer.send under kv.transfer.receive",
    )
    assert send["attributes"]["pdmesh.instance_id"] == "prefill-0"
    assert receive["attributes"]["pdmesh.kv.backend"] == send["attributes"]["pdmesh.kv.backend"] == "tcp"
    assert receive["attributes"]["pdmesh.kv.bytes"] == send["attributes"]["pdmesh.kv.bytes"] > 0
    assert {s["service"] for s in spans.find(lambda s: s["trace_id"] == trace_id)} == {
        "pdmesh-coordinator",
        "pdmesh-worker",
    }


def test_grpc_generate_is_traced_with_gen_ai_attributes(traced_stack, collector):
    spans, _ = collector

    async def generate():
        async with open_channel(traced_stack.coordinator_grpc) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            request = coordinator_pb2.GenerateRequest(
                request_id="traced-generate",
                prompt="gRPC is traced too",
                sampling=common_pb2.SamplingParams(max_tokens=4),
            )
            return [reply async for reply in stub.Generate(request, timeout=60)]

    replies = asyncio.run(generate())
    assert replies[-1].finished
    generate_span = spans.wait_for(
        lambda s: (
            s["name"] == "/pdmesh.v1.Coordinator/Generate"
            and s["attributes"].get("gen_ai.response.id") == "traced-generate"
        ),
        "for Generate",
    )
    attributes = generate_span["attributes"]
    assert attributes["gen_ai.usage.output_tokens"] == replies[-1].usage.completion_tokens
    assert attributes["gen_ai.usage.input_tokens"] == replies[-1].usage.prompt_tokens
    assert attributes["gen_ai.request.max_tokens"] == 4
    trace_id = generate_span["trace_id"]
    spans.wait_for(_in(trace_id, "/pdmesh.v1.Worker/Decode", "pdmesh-worker"), "Decode in the Generate trace")


def test_the_controller_traces_the_calls_it_serves_and_flushes_on_stop(traced_stack, collector):
    """The controller is on no request's path: its spans are the calls it serves, each in its caller's
    trace (a worker's Register). The coordinator's cluster watch is a stream that ends only when the
    stack stops: its spans arrive because stopping flushes what is buffered. (Runs last: it stops
    the module's stack.)"""
    spans, _ = collector
    for worker in ("prefill-0", "decode-0"):
        register = spans.wait_for(
            lambda s, worker=worker: (
                s["name"] == "/pdmesh.v1.Controller/Register"
                and s["service"] == "pdmesh-worker"
                and s["attributes"].get("pdmesh.instance_id") == worker
            ),
            f"for {worker}'s Register call",
        )
        served = spans.wait_for(
            _in(
                register["trace_id"],
                "/pdmesh.v1.Controller/Register",
                "pdmesh-controller",
                register["span_id"],
            ),
            f"for the controller serving {worker}'s Register",
        )
        assert served["resource"]["pdmesh.service"] == "controller"
    watch = "/pdmesh.v1.Controller/WatchCluster"
    assert not spans.find(lambda s: s["name"] == watch and s["service"] == "pdmesh-controller")
    traced_stack.stop()
    spans.wait_for(lambda s: s["name"] == watch and s["service"] == "pdmesh-controller", "for the watch")
    spans.wait_for(lambda s: s["name"] == watch and s["service"] == "pdmesh-coordinator", "for the watch")
