"""The coordinator's metrics over real processes: real requests move its series by exactly what they
did, a full coordinator's 429 is counted, and ``/metrics/mesh`` carries every worker's and the
controller's series in one valid exposition (a worker that does not answer is left out and counted)."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.launcher import LocalStack
from pdmesh.observability.mesh_scrape import SCRAPE_TIMEOUT_S
from pdmesh.rpc.client import open_channel
from pdmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from tests.e2e.conftest import start_stack
from tests.e2e.helpers import wait_until

pytestmark = pytest.mark.timeout(120)

C = "pdmesh_coordinator_"


@pytest.fixture(scope="module")
def stack(tiny_qwen3, tmp_path_factory) -> Iterator[LocalStack]:
    # one request at a time and no queue: a second one is refused at once (429)
    limits = {"max-inflight": "1", "max-queue": "0"}
    stack = start_stack(tiny_qwen3, tmp_path_factory, prefill=1, decode=1, coordinator_args=limits)
    try:
        yield stack
    finally:
        stack.stop()


def scrape(stack: LocalStack, path: str = "/metrics") -> str:
    response = httpx.get(f"http://{stack.metrics_address('coordinator')}{path}", timeout=30)
    assert response.status_code == 200, response.text
    return response.text


def value(text: str, sample: str, **labels: str) -> float:
    """The sum of the samples named ``sample`` whose labels include ``labels`` (0 when none)."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    )


def complete(stack: LocalStack, max_tokens: int, **extra) -> httpx.Response:
    body = {"prompt": "The sea is", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}
    return httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=60)


def test_a_request_moves_the_histograms_by_one_and_the_tokens_by_its_usage(stack):
    before = scrape(stack)
    response = complete(stack, 5)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    after = scrape(stack)

    def moved(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    assert moved(C + "time_to_first_token_seconds_count") == 1
    assert moved(C + "e2e_request_latency_seconds_count") == 1
    assert moved(C + "queue_time_seconds_count") == 1
    assert moved(C + "inter_token_latency_seconds_count") == usage["completion_tokens"] - 1
    assert moved(C + "prompt_tokens_total") == usage["prompt_tokens"]
    assert moved(C + "generation_tokens_total") == usage["completion_tokens"] == 5
    ok = {"endpoint": "/v1/completions", "status": "200", "finish_reason": "length"}
    assert moved(C + "requests_total", **ok) == 1
    assert moved(C + "route_choices_total", role="prefill", pdmesh_instance="prefill-0") == 1
    assert moved(C + "route_choices_total", role="decode", pdmesh_instance="decode-0") == 1
    assert value(after, C + "requests_inflight") == 0 and value(after, C + "requests_queued") == 0
    # vLLM's bucket edges: dashboards built for vLLM read these histograms unchanged
    edges = {
        s.labels["le"]
        for f in text_string_to_metric_families(after)
        for s in f.samples
        if s.name == C + "time_to_first_token_seconds_bucket"
    }
    assert {"0.001", "0.06", "2560.0", "+Inf"} <= edges


def test_grpc_and_bad_requests_are_counted_by_status(stack):
    before = scrape(stack)

    async def generate():
        async with open_channel(stack.coordinator_grpc) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            request = coordinator_pb2.GenerateRequest(
                prompt="The sea is", sampling=common_pb2.SamplingParams(max_tokens=3, ignore_eos=True)
            )
            replies = [r async for r in stub.Generate(request, timeout=60)]
            bad = coordinator_pb2.GenerateRequest(prompt_ids=coordinator_pb2.TokenIds(ids=[10**6]))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                _ = [r async for r in stub.Generate(bad, timeout=60)]
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            return replies

    replies = asyncio.run(generate())
    assert replies[-1].usage.completion_tokens == 3
    assert complete(stack, 0).status_code == 400  # max_tokens must be >= 1
    after = scrape(stack)
    grpc_ok = {"endpoint": "pdmesh.v1.Coordinator/Generate", "status": "OK", "finish_reason": "length"}
    assert value(after, C + "requests_total", **grpc_ok) - value(before, C + "requests_total", **grpc_ok) == 1
    invalid = {"endpoint": "pdmesh.v1.Coordinator/Generate", "status": "INVALID_ARGUMENT"}
    assert value(after, C + "requests_total", **invalid) - value(before, C + "requests_total", **invalid) == 1
    bad = {"endpoint": "/v1/completions", "status": "400", "finish_reason": ""}
    assert value(after, C + "requests_total", **bad) - value(before, C + "requests_total", **bad) == 1
    tokens = value(after, C + "generation_tokens_total") - value(before, C + "generation_tokens_total")
    assert tokens == 3


def test_a_full_coordinator_counts_its_429(stack):
    """prefill-0 is stopped (SIGSTOP) so that one request holds the only slot; far shorter than the
    3 s after which the controller would suspect it (the default suspect_after_s)."""
    before = scrape(stack)
    holder: list[httpx.Response] = []
    stack.kill("prefill-0", signal.SIGSTOP)
    try:
        thread = threading.Thread(target=lambda: holder.append(complete(stack, 2)))
        thread.start()
        wait_until(lambda: value(scrape(stack), C + "requests_inflight") == 1, 10, "the slot taken")
        refused = complete(stack, 2)
    finally:
        stack.kill("prefill-0", signal.SIGCONT)
    thread.join(60)
    assert refused.status_code == 429, refused.text
    assert holder and holder[0].status_code == 200, holder
    after = scrape(stack)
    full = {"endpoint": "/v1/completions", "status": "429"}
    assert value(after, C + "requests_total", **full) - value(before, C + "requests_total", **full) == 1


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_mesh_metrics_carry_every_worker_and_the_controller(stack):
    assert complete(stack, 2).status_code == 200
    text = scrape(stack, "/metrics/mesh")
    families = _families(text)  # parses as Prometheus text
    for kind in ("HELP", "TYPE"):
        names = [line.split()[2] for line in text.splitlines() if line.startswith(f"# {kind} ")]
        assert len(names) == len(set(names)), f"a family's {kind} repeats"
    running = families["pdmesh_worker_requests_running"].samples
    assert {s.labels["pdmesh_instance"] for s in running} == {"prefill-0", "decode-0"}
    assert any(s.name.startswith("pdmesh_controller_") for f in families.values() for s in f.samples)
    assert value(text, C + "requests_total", endpoint="/v1/completions") >= 1


def test_a_worker_that_does_not_answer_is_left_out_and_counted(stack):
    """decode-0 is stopped (SIGSTOP) for one scrape, SCRAPE_TIMEOUT_S: it may turn suspect but stays in
    the view, which it leaves only after the default dead_after_s (6 s) without heartbeats."""
    assert SCRAPE_TIMEOUT_S < 6.0 - 1.0  # the premise, with a heartbeat interval to spare
    before = value(scrape(stack), C + "scrape_failures_total", target="decode-0")
    stack.kill("decode-0", signal.SIGSTOP)
    try:
        text = scrape(stack, "/metrics/mesh")
    finally:
        stack.kill("decode-0", signal.SIGCONT)
    running = _families(text)["pdmesh_worker_requests_running"].samples
    assert {s.labels["pdmesh_instance"] for s in running} == {"prefill-0"}
    assert value(text, C + "scrape_failures_total", target="decode-0") == before + 1
