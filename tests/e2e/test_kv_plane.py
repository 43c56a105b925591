"""The KV data plane over real processes: every CPU transfer backend moves a real request's KV
from a prefill process to a decode process and decoding continues exactly as one engine would;
a dead prefill instance's handles are invalidated so that decode fails fast; a Redis outage gives
clear errors and service comes back with Redis."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import SamplingParams
from pdmesh.rpc.client import open_channel
from pdmesh.tokenizer import Tokenizer
from pdmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.e2e.conftest import start_stack
from tests.e2e.helpers import list_instances, wait_blocks_idle

pytestmark = pytest.mark.timeout(180)

PROMPT_IDS = [5, 77, 300, 12, 640, 41, 9, 18, 250, 3, 99, 410, 27, 8, 512, 66, 71, 2, 45, 130]
SAMPLING = common_pb2.SamplingParams(
    temperature=0, top_p=1, repetition_penalty=1, max_tokens=8, ignore_eos=True
)
FAST_HEALTH = {"heartbeat-interval-s": "0.2", "suspect-after-s": "0.6", "dead-after-s": "1.2"}


def engine_greedy_text(model_dir, max_tokens: int) -> str:
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), kv_cache_memory_mib=8))
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine.add_request(EngineRequest("ref", PROMPT_IDS, sampling))
    tokens: list[int] = []
    while engine.has_unfinished():
        for output in engine.step():
            tokens.extend(output.token_ids)
    return Tokenizer.from_dir(model_dir).decode(tokens)


def complete(stack, max_tokens: int = 16) -> httpx.Response:
    body = {"prompt": PROMPT_IDS, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    body["model"] = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    return httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=60)


@pytest.mark.parametrize("backend", ["tcp", "shm", "device"])
def test_backend_moves_kv_and_decode_matches_one_engine(backend, tiny_qwen3, tmp_path_factory):
    stack = start_stack(tiny_qwen3, tmp_path_factory, worker_args={"transfer-backend": backend})
    try:
        response = complete(stack)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == engine_greedy_text(tiny_qwen3, 16)
        assert "pulled" in stack.log_tail("decode-0", 200)
        wait_blocks_idle(stack.controller_address)
    finally:
        stack.stop()


async def _prefill(address: str) -> worker_pb2.PrefillResponse:
    async with open_channel(address) as channel:
        request = worker_pb2.PrefillRequest(
            request_id="orphan",
            prompt_ids=PROMPT_IDS,
            sampling=SAMPLING,
        )
        return await worker_pb2_grpc.WorkerStub(channel).Prefill(request, timeout=30)


async def _decode(address: str, reply: worker_pb2.PrefillResponse) -> list[worker_pb2.DecodeChunk]:
    async with open_channel(address) as channel:
        request = worker_pb2.DecodeRequest(
            request_id="orphan",
            prompt_ids=PROMPT_IDS,
            first_token=reply.first_token,
            sampling=SAMPLING,
            handle=reply.handle,
        )
        return [c async for c in worker_pb2_grpc.WorkerStub(channel).Decode(request, timeout=30)]


def _wait_gone(controller: str, instance_id: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if instance_id not in {i.instance_id for i in list_instances(controller)}:
            return
        time.sleep(0.1)
    raise AssertionError(f"{instance_id} still in the cluster view")


def test_dead_prefill_invalidates_its_handles_and_decode_fails_fast(tiny_qwen3, tmp_path_factory):
    stack = start_stack(tiny_qwen3, tmp_path_factory, controller_args=FAST_HEALTH)
    try:
        addresses = {i.instance_id: i.address for i in list_instances(stack.controller_address)}
        reply = asyncio.run(_prefill(addresses["prefill-0"]))
        assert reply.handle.handle_id
        stack.kill("prefill-0", signal.SIGKILL)
        _wait_gone(stack.controller_address, "prefill-0")
        assert complete(stack).status_code == 503  # no prefill instance left

        started = time.monotonic()
        chunks = asyncio.run(_decode(addresses["decode-0"], reply))
        assert time.monotonic() - started < 5
        assert chunks[-1].error.code == common_pb2.ERROR_CODE_KV_UNAVAILABLE
        assert "invalidated" in chunks[-1].error.message or "expired" in chunks[-1].error.message
        decode = [i for i in list_instances(stack.controller_address) if i.instance_id == "decode-0"][0]
        assert decode.load.free_blocks == decode.load.total_blocks
    finally:
        stack.stop()


def test_redis_outage_gives_clear_errors_and_service_returns(tiny_qwen3, tmp_path_factory):
    stack = start_stack(tiny_qwen3, tmp_path_factory)
    try:
        assert complete(stack).status_code == 200
        stack.redis.stop()
        response = complete(stack)
        assert response.status_code == 503
        assert "register" in response.json()["error"]["message"]
        stack.redis.start()
        deadline = time.monotonic() + 20
        while (response := complete(stack)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert response.status_code == 200, response.text
        assert all(p.poll() is None for p in stack.processes.values()), "a service died during the outage"
        wait_blocks_idle(stack.controller_address)
    finally:
        stack.stop()
