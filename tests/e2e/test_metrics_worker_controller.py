"""The workers' and the controller's /metrics, scraped from a real stack after real requests.

One stack for the module (2 prefill + 1 decode over tcp, ratio off, fast health timings). Values
are summed over the workers of a role where routing picks the worker. prefill-1 is flipped to
decode and back; the last test SIGKILLs the decode worker, so it runs last.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.launcher import LocalStack
from pdmesh.membership import Role
from pdmesh.rpc.client import open_channel
from pdmesh.rpc.convert_cluster import role_from_proto, role_to_proto, state_from_proto
from pdmesh.v1 import controller_pb2, controller_pb2_grpc
from tests.e2e.conftest import start_stack
from tests.e2e.helpers import wait_until

pytestmark = pytest.mark.timeout(180)

FAST_HEALTH = {"heartbeat-interval-s": "0.2", "suspect-after-s": "0.6", "dead-after-s": "1.2"}
# what a heartbeat takes to carry a new load to the controller, with room for a loaded machine
HEARTBEAT_WAIT_S = 10 * float(FAST_HEALTH["heartbeat-interval-s"]) + 5
FLIP_TIMEOUT_S = 60  # a flip drains (nothing runs here), settles for 1.5 heartbeats and switches
# Long enough to fill several KV blocks (16 tokens each), so that a repeat hits the prefix cache.
PROMPT = " ".join(f"word{i}" for i in range(120))
WORKERS = {"prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode"}


@pytest.fixture(scope="module")
def stack(tiny_qwen3, tmp_path_factory) -> Iterator[LocalStack]:
    stack = start_stack(
        tiny_qwen3,
        tmp_path_factory,
        prefill=2,
        controller_args=FAST_HEALTH,
        worker_args={"transfer-backend": "tcp"},
    )
    try:
        yield stack
    finally:
        stack.stop()


def scrape(address: str) -> list:
    response = httpx.get(f"http://{address}/metrics", timeout=10)
    assert response.status_code == 200
    return list(text_string_to_metric_families(response.text))


def value(families: list, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(
        s.value
        for f in families
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def workers(stack: LocalStack, *names: str) -> list:
    """The families of these workers (every worker by default), in one list."""
    return [f for name in names or WORKERS for f in scrape(stack.metrics_address(name))]


def controller(stack: LocalStack) -> list:
    return scrape(stack.metrics_address("controller"))


async def _call(stack: LocalStack, method: str, request):
    async with open_channel(stack.controller_address) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        return await getattr(stub, method)(request, timeout=FLIP_TIMEOUT_S)


def list_instances(stack: LocalStack) -> controller_pb2.ListInstancesResponse:
    return asyncio.run(_call(stack, "ListInstances", controller_pb2.ListInstancesRequest()))


def flip(stack: LocalStack, instance_id: str, role: Role):
    request = controller_pb2.FlipRoleRequest(instance_id=instance_id, role=role_to_proto(role))
    return asyncio.run(_call(stack, "FlipRole", request))


def complete(stack: LocalStack, prompt: str, max_tokens: int = 4) -> dict:
    model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    response = httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_every_service_advertises_its_metrics_address(stack):
    reply = list_instances(stack)
    assert reply.metrics_address == stack.metrics_address("controller")
    advertised = {i.instance_id: i.metrics_address for i in reply.instances}
    assert advertised == {name: stack.metrics_address(name) for name in WORKERS}
    for name, role in WORKERS.items():
        families = workers(stack, name)
        labels = {"pdmesh_instance": name, "role": role}
        assert value(families, "pdmesh_worker_kv_blocks_free", **labels) > 0
        assert value(families, "pdmesh_worker_requests_running", **labels) == 0


def test_a_request_moves_the_step_counts_and_the_prompt_tokens(stack):
    before = workers(stack)
    usage = complete(stack, "Count the steps.", max_tokens=5)["usage"]
    after = workers(stack)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    prefill = {"role": "prefill", "phase": "prefill"}
    assert moved("pdmesh_worker_step_duration_seconds_count", **prefill) == 1  # one prompt, one step
    assert moved("pdmesh_worker_batch_size_sum", **prefill) == 1
    queried = moved("pdmesh_worker_prefix_cache_queries_tokens_total", role="prefill")
    assert queried == usage["prompt_tokens"]
    decode = {"pdmesh_instance": "decode-0", "role": "decode", "phase": "decode"}
    # the first token comes from prefill; each later one from a decode step (one request: batch 1)
    steps = moved("pdmesh_worker_step_duration_seconds_count", **decode)
    assert steps == usage["completion_tokens"] - 1
    assert moved("pdmesh_worker_batch_size_sum", **decode) == steps


def test_a_repeated_prompt_moves_the_hit_counter_by_the_hit_tokens(stack):
    hits = "pdmesh_worker_prefix_cache_hits_tokens_total"
    complete(stack, PROMPT)
    before = value(workers(stack), hits, role="prefill")
    complete(stack, PROMPT)  # cache-aware routing sends it to the worker that holds its prefix
    after = value(workers(stack), hits, role="prefill")
    assert after - before >= 16  # at least one whole block of the repeated prompt came from the cache

    def reported() -> int:
        return sum(
            i.load.prefix_cache_hit_tokens
            for i in list_instances(stack).instances
            if role_from_proto(i.role) == Role.PREFILL
        )

    wait_until(lambda: reported() == after, HEARTBEAT_WAIT_S, "the controller's load to report the hits")


def test_kv_transfer_bytes_match_on_both_sides(stack):
    complete(stack, "Move my KV cache.")
    received = workers(stack, "decode-0")
    got = value(received, "pdmesh_worker_kv_transfer_bytes_total", backend="tcp", direction="receive")
    assert got > 0

    def sent() -> float:
        return value(
            workers(stack, "prefill-0", "prefill-1"),
            "pdmesh_worker_kv_transfer_bytes_total",
            direction="send",
        )

    # the server counts a pull once its last byte is sent, the client once its last byte is in
    wait_until(lambda: sent() == got, 10, "the prefill side's sent bytes to match")
    pulls = value(received, "pdmesh_worker_kv_transfer_duration_seconds_count", backend="tcp")
    handles_claimed = value(received, "pdmesh_worker_kv_handles_total", event="claimed")
    assert pulls == handles_claimed > 0
    assert value(received, "pdmesh_worker_kv_transfer_failures_total") == 0


def test_every_registered_handle_is_released(stack):
    def handles(event: str) -> float:
        return value(workers(stack, "prefill-0", "prefill-1"), "pdmesh_worker_kv_handles_total", event=event)

    registered_before = handles("registered")
    complete(stack, "Register a handle.")
    complete(stack, "And another one.")
    assert handles("registered") == registered_before + 2
    wait_until(lambda: handles("released") == handles("registered"), 10, "every handle released")
    assert handles("expired") == 0
    claimed = value(workers(stack, "decode-0"), "pdmesh_worker_kv_handles_total", event="claimed")
    assert claimed == handles("registered")


def test_a_flip_moves_the_role_label_and_counts_by_outcome(stack):
    with pytest.raises(grpc.RpcError) as refused:
        flip(stack, "decode-0", Role.PREFILL)  # the last decode instance
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    flips = "pdmesh_controller_role_flips_total"
    assert value(controller(stack), flips, from_role="decode", to_role="prefill", outcome="refused") == 1

    flip(stack, "prefill-1", Role.DECODE)
    flipped = workers(stack, "prefill-1")
    assert value(flipped, "pdmesh_worker_kv_blocks_free", pdmesh_instance="prefill-1", role="decode") > 0
    assert value(flipped, "pdmesh_worker_kv_blocks_free", role="prefill") == 0
    listed = {i.instance_id: i for i in list_instances(stack).instances}["prefill-1"]
    assert role_from_proto(listed.role) == Role.DECODE
    assert listed.metrics_address == stack.metrics_address("prefill-1")
    flip(stack, "prefill-1", Role.PREFILL)
    counted = controller(stack)
    assert value(counted, flips, from_role="prefill", to_role="decode", outcome="ok") == 1
    assert value(counted, flips, from_role="decode", to_role="prefill", outcome="ok") == 1
    assert value(counted, flips, outcome="failed") == 0


def controller_instances(stack: LocalStack) -> dict[tuple[str, str], float]:
    return {
        (s.labels["role"], s.labels["state"]): s.value
        for f in controller(stack)
        for s in f.samples
        if s.name == "pdmesh_controller_instances"
    }


def test_controller_counts_match_list_instances(stack):
    reply = list_instances(stack)
    listed: dict[tuple[str, str], int] = {}
    for i in reply.instances:
        key = (role_from_proto(i.role).value, state_from_proto(i.state).value)
        listed[key] = listed.get(key, 0) + 1
    counted = {k: v for k, v in controller_instances(stack).items() if v}
    assert counted == listed == {("prefill", "healthy"): 2, ("decode", "healthy"): 1}
    families = controller(stack)
    assert value(families, "pdmesh_controller_lease_active") == 1
    assert value(families, "pdmesh_controller_fencing_token") == reply.fencing_token > 0
    assert value(families, "pdmesh_controller_takeovers_total") == 1
    target = "pdmesh_controller_role_instances_target"
    assert not [s for f in families for s in f.samples if s.name == target]  # the ratio is off
    asyncio.run(_call(stack, "SetRatio", controller_pb2.SetRatioRequest(ratio="2:1")))  # as it stands
    try:
        families = controller(stack)
        assert value(families, target, role="prefill") == 2
        assert value(families, target, role="decode") == 1
    finally:
        asyncio.run(_call(stack, "SetRatio", controller_pb2.SetRatioRequest(ratio="off")))


def test_a_killed_worker_shows_up_as_dead(stack):
    """Runs last: the stack has no decode worker afterwards."""
    stack.kill("decode-0", signal.SIGKILL)
    dead_after_s = float(FAST_HEALTH["dead-after-s"])
    wait_until(
        lambda: controller_instances(stack).get(("decode", "dead")) == 1,
        dead_after_s + HEARTBEAT_WAIT_S,
        "the killed decode worker counted as dead",
    )
    counted = controller_instances(stack)
    assert counted[("decode", "healthy")] == counted[("decode", "suspect")] == 0
    assert counted[("prefill", "healthy")] == 2
    assert "decode-0" not in {i.instance_id for i in list_instances(stack).instances}
