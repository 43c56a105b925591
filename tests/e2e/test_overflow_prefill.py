"""While every prefill instance is busy, the decode instance prefills the next prompt itself.

The prefill worker is kept busy on purpose: Redis writes are held (``CLIENT PAUSE <ms> WRITE``), so
the first request's Prefill call stays open after its first token (its KV handle's registration
waits). A second request then arrives at a coordinator whose only prefill instance has a prompt in
flight: with ``--overflow-prefill-tokens`` it is served whole by the decode worker, which needs no
Redis write for it, so it completes while the first is still held; without, it would queue behind.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
import redis

from tests.e2e.conftest import start_stack
from tests.e2e.helpers import wait_blocks_idle

pytestmark = pytest.mark.timeout(120)

PAUSE_MS = 20_000  # an upper bound only: the test lets Redis go as soon as the second request is done
MAX_TOKENS = 5
OVERFLOWS = re.compile(
    r'^pdmesh_coordinator_overflow_prefills_total\{pdmesh_instance="decode-0"\} (\S+)', re.M
)


def _overflows(stack) -> float:
    text = httpx.get(f"http://{stack.metrics_address('coordinator')}/metrics", timeout=10).text
    found = OVERFLOWS.search(text)
    return float(found.group(1)) if found else 0.0


def _body(model: str, prompt: str, stream: bool) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    } | {"stream": stream}


def test_a_busy_prefill_worker_overflows_to_the_decode_worker(tiny_qwen3, tmp_path_factory):
    args = {"overflow-prefill-tokens": "256", "max-retry": "0"}
    stack = start_stack(tiny_qwen3, tmp_path_factory, coordinator_args=args)
    client = redis.Redis.from_url(stack.redis_url)
    try:
        model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        url = f"{stack.base_url}/v1/completions"
        alone = httpx.post(url, json=_body(model, "An idle prefill worker", False), timeout=60)
        assert alone.status_code == 200 and _overflows(stack) == 0  # an idle prefill worker takes it
        client.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
        paused = True
        try:
            with httpx.stream("POST", url, json=_body(model, "The first prompt", True), timeout=60) as first:
                assert first.status_code == 200
                lines = first.iter_lines()
                next(line for line in lines if line.startswith("data:"))  # its Prefill call is open
                second = httpx.post(url, json=_body(model, "The second prompt", False), timeout=60)
                assert second.status_code == 200, second.text
                assert second.json()["usage"]["completion_tokens"] == MAX_TOKENS
                assert _overflows(stack) == 1
                client.execute_command("CLIENT", "UNPAUSE")
                paused = False
                events = [json.loads(x[5:]) for x in lines if x.startswith("data:") and "[DONE]" not in x]
        finally:
            if paused:
                client.execute_command("CLIENT", "UNPAUSE")
        assert events[-1]["choices"][0]["finish_reason"] == "length"  # the held request finished too
        wait_blocks_idle(stack.controller_address)
    finally:
        client.close()
        stack.stop()
