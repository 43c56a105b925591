"""Cache-aware routing over real processes: a repeated prefix goes to the prefill instance that
holds it, measured by that instance's prefix-cache hits."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.conftest import start_stack
from tests.e2e.helpers import list_instances

pytestmark = pytest.mark.timeout(180)

SYSTEM = "You answer questions about the weather, the sea and cooking. " * 12


def test_cache_aware_sends_a_repeated_prefix_to_its_holder(tiny_qwen3, tmp_path_factory):
    stack = start_stack(
        tiny_qwen3,
        tmp_path_factory,
        prefill=2,
        decode=1,
        coordinator_args={"prefill-policy": "cache_aware"},
        controller_args={"heartbeat-interval-s": "0.2"},
    )
    try:
        model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        for i in range(5):
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}]
            body = {"model": model, "messages": messages, "max_tokens": 2}
            assert (
                httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=60).status_code == 200
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            prefills = [
                i for i in list_instances(stack.controller_address) if i.instance_id.startswith("prefill")
            ]
            holder = max(prefills, key=lambda i: i.load.prefix_cache_hit_tokens)
            if holder.load.prefix_cache_hit_tokens >= 4 * 100:
                break
            time.sleep(0.2)
        other = [i for i in prefills if i.instance_id != holder.instance_id][0]
        assert holder.load.prefix_cache_hit_tokens >= 4 * 100  # four repeats of a >100-token prefix
        assert other.load.prefix_cache_query_tokens == 0  # the other instance never saw the prompt
    finally:
        stack.stop()


def test_short_prompts_are_prefilled_by_the_decode_instance(tiny_qwen3, tmp_path_factory):
    stack = start_stack(
        tiny_qwen3,
        tmp_path_factory,
        coordinator_args={"local-prefill-threshold": "24"},
        controller_args={"heartbeat-interval-s": "0.2"},
    )
    try:
        model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        short = {"model": model, "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0}
        long = {**short, "prompt": list(range(10, 60))}
        for body in (short, long):
            assert httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=60).status_code == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            loads = {i.instance_id: i.load for i in list_instances(stack.controller_address)}
            if loads["prefill-0"].prompt_tokens_total and loads["decode-0"].prompt_tokens_total:
                break
            time.sleep(0.2)
        assert loads["prefill-0"].prompt_tokens_total == 50  # only the long prompt went to prefill
        assert loads["decode-0"].prompt_tokens_total == 4  # the short one was prefilled locally
    finally:
        stack.stop()
