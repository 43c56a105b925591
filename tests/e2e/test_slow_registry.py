"""A slow Redis: while a prefill worker's handle registration waits on Redis, its reaper must not take
"not in Redis yet" for "dead" and free the blocks the coordinator is about to hand to a decode worker.

Redis is slowed with ``CLIENT PAUSE <ms> WRITE``: reads (the reaper's lookups) go on, writes (the
registration) wait. The reaper looks every 0.5 s, so it looks several times during the pause.
"""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from tests.e2e.conftest import start_stack
from tests.e2e.helpers import wait_blocks_idle, wait_until

pytestmark = pytest.mark.timeout(120)

PAUSE_MS = 1500  # three reaper passes; under the registry client's 2 s socket timeout


def _complete(stack, prompt: str) -> httpx.Response:
    model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=60)


def test_a_registration_in_flight_is_never_reaped(tiny_qwen3, tmp_path_factory):
    # no retry: a handle freed under the coordinator's feet would be a user-visible failure
    stack = start_stack(tiny_qwen3, tmp_path_factory, coordinator_args={"max-retry": "0"})
    client = redis.Redis.from_url(stack.redis_url)
    try:
        assert _complete(stack, "Warm up the path").status_code == 200
        client.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
        paused_at = time.monotonic()
        response = _complete(stack, "A request while Redis is slow to write")
        assert time.monotonic() - paused_at >= PAUSE_MS / 1000 * 0.9, "the request did not wait for Redis"
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 8
        wait_blocks_idle(stack.controller_address)
        wait_until(lambda: not list(client.scan_iter("pdmesh:kv:*")), 5, "no KV handle left in Redis")
        log = stack.log_tail("prefill-0", lines=200)
        assert "KV_UNAVAILABLE" not in log and "Release at" not in log, log
    finally:
        client.close()
        stack.stop()
