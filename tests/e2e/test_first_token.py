"""The first token of a disaggregated request reaches the client before its KV handle is registered.

The prefill worker hands the token to the coordinator ahead of the handle's registration in Redis
(and so ahead of the KV transfer and the decode worker's first step). Redis writes are held with
``CLIENT PAUSE <ms> WRITE``: the registration waits while reads go on, so the test can see that the
client has token 1 while no handle of its request exists yet, then lets Redis go and reads the rest.
"""

from __future__ import annotations

import json

import httpx
import pytest
import redis

from tests.e2e.conftest import start_stack
from tests.e2e.helpers import wait_blocks_idle

pytestmark = pytest.mark.timeout(120)

# Only an upper bound: the test lets Redis go as soon as the first token arrives. Without the early
# token the registration would wait out the pause and the handle would exist by then.
PAUSE_MS = 10_000
MAX_TOKENS = 6


def _events(lines) -> list[dict]:
    return [json.loads(line[5:]) for line in lines if line.startswith("data:") and "[DONE]" not in line]


def test_token_one_streams_while_the_kv_handle_is_not_registered_yet(tiny_qwen3, tmp_path_factory):
    stack = start_stack(tiny_qwen3, tmp_path_factory, coordinator_args={"max-retry": "0"})
    client = redis.Redis.from_url(stack.redis_url)
    try:
        model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "prompt": "A prompt for the prefill worker", "max_tokens": MAX_TOKENS}
        body |= {"temperature": 0, "ignore_eos": True, "stream": True}
        client.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
        paused = True
        try:
            with httpx.stream("POST", f"{stack.base_url}/v1/completions", json=body, timeout=60) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                first = next(line for line in lines if line.startswith("data:"))
                response_id = json.loads(first[5:])["id"]
                handles = list(client.scan_iter(f"pdmesh:kv:{response_id}*"))
                client.execute_command("CLIENT", "UNPAUSE")
                paused = False
                assert handles == [], "token 1 waited for the KV handle's registration"
                events = _events([first, *lines])
        finally:
            if paused:
                client.execute_command("CLIENT", "UNPAUSE")
        tokens = [e for e in events if e["choices"]]
        assert len(tokens) == MAX_TOKENS  # one event per token: the rest came through the decode worker
        assert tokens[-1]["choices"][0]["finish_reason"] == "length"
        wait_blocks_idle(stack.controller_address)
    finally:
        client.close()
        stack.stop()
