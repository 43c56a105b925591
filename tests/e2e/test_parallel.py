"""Instances that span several ranks, through the whole mesh (real processes, gloo, real Redis).

- prefill (tp 2, moe_ep 2) -> decode (dp 2, moe_ep 2) on Qwen3-MoE gives the text one engine gives,
  a repeated prompt hits the prefill instance's prefix cache, and a lone request leaves one decode
  replica idle (it must join every MoE collective with an empty batch, or the step would hang);
- prefill tp 2 -> decode tp 1, prefill tp 1 -> decode tp 2 (KV heads gathered or sliced) and prefill
  dp 2 -> decode tp 2 on Qwen3;
- kill -9 of a decode instance's follower rank during a burst: every request completes (migrated to
  the other decode instance), and the broken instance comes back whole under its own id;
- `pdmesh ctl flip` of a tp 2 instance, decode -> prefill -> decode: in each role it alone serves
  (the other instance of that role drained) and gives the text one engine gives.
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import SamplingParams
from pdmesh.tokenizer import Tokenizer
from pdmesh.v1 import common_pb2
from tests.e2e.conftest import start_stack
from tests.e2e.helpers import list_instances, wait_blocks_idle, wait_until
from tests.e2e.test_control_plane import ctl
from tests.e2e.test_kv_plane import PROMPT_IDS, engine_greedy_text

pytestmark = pytest.mark.timeout(300)

FAST_HEALTH = {"heartbeat-interval-s": "0.2", "suspect-after-s": "0.6", "dead-after-s": "1.2"}
OTHER_PROMPT = [7, 19, 311, 48, 90, 600, 14, 230]


def text_of(stack, prompt: list[int], max_tokens: int = 16) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    body["model"] = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    response = httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def load_of(stack, instance_id: str):
    return next(i.load for i in list_instances(stack.controller_address) if i.instance_id == instance_id)


@pytest.fixture(scope="module")
def moe_stack(model_factory, tmp_path_factory):
    stack = start_stack(
        model_factory("qwen3_moe", "tiny"),
        tmp_path_factory,
        role_args={
            "prefill": {"tp": "2", "moe-ep": "2", "moe-tp": "1"},
            "decode": {"dp": "2", "moe-ep": "2"},
        },
    )
    try:
        yield stack
    finally:
        stack.stop()


def test_moe_prefill_tp2_ep2_to_decode_dp2_ep2_matches_one_engine(moe_stack, model_factory):
    model = model_factory("qwen3_moe", "tiny")
    expected = engine_greedy_text(model, 16)
    assert text_of(moe_stack, PROMPT_IDS) == expected  # alone: one decode replica idle
    assert "all 2 ranks of the instance are up" in moe_stack.log_tail("decode-0", 400)
    # again: the prompt's full blocks come from the prefill instance's prefix cache
    hits_before = load_of(moe_stack, "prefill-0").prefix_cache_hit_tokens
    assert text_of(moe_stack, PROMPT_IDS) == expected
    wait_until(
        lambda: load_of(moe_stack, "prefill-0").prefix_cache_hit_tokens > hits_before,
        10,
        "a prefix-cache hit",
    )
    wait_blocks_idle(moe_stack.controller_address)


def test_moe_concurrent_requests_use_both_decode_replicas(moe_stack, model_factory):
    model = model_factory("qwen3_moe", "tiny")
    prompts = [PROMPT_IDS, OTHER_PROMPT, PROMPT_IDS[:11], OTHER_PROMPT[:5]]
    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(lambda p: text_of(moe_stack, p, 24), prompts))
    reference = [_engine_text(model, p, 24) for p in prompts]
    assert texts == reference
    wait_blocks_idle(moe_stack.controller_address)


def _engine_text(model, prompt: list[int], max_tokens: int) -> str:
    """The text one single-process engine (what a mixed worker runs) generates for ``prompt``."""
    engine = LLMEngine(EngineConfig(model_dir=str(model), kv_cache_memory_mib=8))
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine.add_request(EngineRequest("ref", prompt, sampling))
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.token_ids]
    return Tokenizer.from_dir(model).decode(tokens)


@pytest.mark.parametrize(
    ("prefill", "decode"),
    [({"tp": "2"}, {}), ({}, {"tp": "2"}), ({"dp": "2"}, {"tp": "2"})],
    ids=["tp2-to-tp1", "tp1-to-tp2", "dp2-to-tp2"],
)
def test_dense_kv_moves_between_different_layouts(prefill, decode, tiny_qwen3, tmp_path_factory):
    stack = start_stack(tiny_qwen3, tmp_path_factory, role_args={"prefill": prefill, "decode": decode})
    try:
        prompts = [PROMPT_IDS, OTHER_PROMPT, PROMPT_IDS[:9], OTHER_PROMPT[:6]]
        with ThreadPoolExecutor(len(prompts)) as pool:  # together: a dp instance spreads them
            texts = list(pool.map(lambda p: text_of(stack, p), prompts))
        assert texts == [_engine_text(tiny_qwen3, p, 16) for p in prompts]
        assert "pulled" in stack.log_tail("decode-0", 200)
        wait_blocks_idle(stack.controller_address)
    finally:
        stack.stop()


def test_flip_a_tp2_instance_both_ways(tiny_qwen3, tmp_path_factory):
    stack = start_stack(tiny_qwen3, tmp_path_factory, decode=2, role_args={"decode": {"tp": "2"}})
    try:
        for argv in (("flip", "decode-1", "prefill"), ("drain", "prefill-0")):
            done = ctl(stack, *argv)
            assert done.returncode == 0, done.stderr
        _serve_until_logged(stack, "decode-1", "on dp replica 0 (2 ranks)", tiny_qwen3)
        for argv in (("undrain", "prefill-0"), ("flip", "decode-1", "decode"), ("drain", "decode-0")):
            done = ctl(stack, *argv)
            assert done.returncode == 0, done.stderr
        _serve_until_logged(stack, "decode-1", "pulled", tiny_qwen3)
        assert "all 2 ranks of the instance are up" in stack.log_tail("decode-1", 400)
        wait_blocks_idle(stack.controller_address)
    finally:
        stack.stop()


def _serve_until_logged(stack, instance_id: str, marker: str, model) -> None:
    """Requests, each with one engine's text, until ``instance_id`` logs ``marker`` for one of them: the
    coordinator learns of a drain from the controller's next view push, a moment after ctl returns."""
    expected = engine_greedy_text(model, 16)

    def served_there() -> bool:
        assert text_of(stack, PROMPT_IDS) == expected
        return marker in stack.log_tail(instance_id, 20)

    wait_until(served_there, 30, f"a request served by {instance_id}", 0.05)


def _follower_pid(stack, name: str) -> int:
    children = psutil.Process(stack.pid(name)).children()
    assert len(children) == 1, children
    return children[0].pid


def test_follower_killed_during_burst(tiny_qwen3, tmp_path_factory):
    stack = start_stack(
        tiny_qwen3,
        tmp_path_factory,
        decode=2,
        role_args={"decode": {"tp": "2"}},
        controller_args=FAST_HEALTH,
        restart_workers=True,
    )
    try:
        payload = {
            "prompt": PROMPT_IDS,
            "max_tokens": 300,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        payload["model"] = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        reference = engine_greedy_text(tiny_qwen3, 300)
        victim, leader = _follower_pid(stack, "decode-0"), stack.pid("decode-0")
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(_stream_text, stack.base_url, payload) for _ in range(6)]
            wait_until(
                lambda: "pulled" in stack.log_tail("decode-0", 100), 60, "decode-0 holding a stream", 0.01
            )
            psutil.Process(victim).send_signal(signal.SIGKILL)
            killed = time.time()
            texts = [f.result(timeout=180) for f in futures]
        assert texts == [reference] * 6  # every stream whole, migrated where it had to be
        assert "the instance broke" in stack.log_tail("decode-0", 400)
        assert "retrying" in stack.log_tail("coordinator", 400)
        wait_until(lambda: stack.pid("decode-0") != leader, 30, "decode-0 restarted")
        wait_until(lambda: _healthy_since(stack, "decode-0", killed), 90, "decode-0 healthy again")
        assert _follower_pid(stack, "decode-0") != victim  # the group came back whole
        assert text_of(stack, PROMPT_IDS) == engine_greedy_text(tiny_qwen3, 16)
        wait_blocks_idle(stack.controller_address)
    finally:
        stack.stop()


def _stream_text(base_url: str, payload: dict) -> str:
    text = ""
    with (
        httpx.Client(timeout=180) as client,
        client.stream("POST", f"{base_url}/v1/completions", json=payload) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                text += "".join(c.get("text") or "" for c in chunk["choices"])
    return text


def _healthy_since(stack, instance_id: str, since: float) -> bool:
    return any(
        i.instance_id == instance_id
        and i.state == common_pb2.INSTANCE_STATE_HEALTHY
        and i.last_heartbeat > since
        for i in list_instances(stack.controller_address)
    )
