"""Admission over real processes: beyond the in-flight limit and the queue, 429 with Retry-After;
503 with Retry-After while no prefill/decode pair is healthy."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import start_stack
from tests.e2e.helpers import wait_blocks_idle

pytestmark = pytest.mark.timeout(180)

FAST_HEALTH = {"heartbeat-interval-s": "0.2", "suspect-after-s": "0.6", "dead-after-s": "1.2"}


def test_full_coordinator_answers_429_then_503_when_a_role_is_gone(model_factory, tmp_path_factory):
    stack = start_stack(
        model_factory("qwen3", "small"),
        tmp_path_factory,
        controller_args=FAST_HEALTH,
        coordinator_args={"max-inflight": "1", "max-queue": "0"},
    )
    try:
        model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "Go on."}], "ignore_eos": True}
        started = threading.Event()

        def long_stream():
            with httpx.stream(
                "POST",
                f"{stack.base_url}/v1/chat/completions",
                json={**body, "max_tokens": 300, "stream": True},
                timeout=120,
            ) as response:
                for _ in response.iter_lines():
                    started.set()

        holder = threading.Thread(target=long_stream)
        holder.start()
        assert started.wait(60)
        refused = httpx.post(
            f"{stack.base_url}/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=30
        )
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        holder.join(120)
        assert (
            httpx.post(
                f"{stack.base_url}/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=60
            ).status_code
            == 200
        )

        stack.kill("decode-0", signal.SIGKILL)
        deadline = time.monotonic() + 15
        while (
            httpx.get(f"{stack.base_url}/health", timeout=5).status_code != 503
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        gone = httpx.post(f"{stack.base_url}/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=30)
        assert gone.status_code == 503 and "retry-after" in gone.headers
        wait_blocks_idle(stack.controller_address)
    finally:
        stack.stop()


def test_request_timeout_is_504_and_frees_the_blocks(model_factory, tmp_path_factory):
    stack = start_stack(
        model_factory("qwen3", "small"),
        tmp_path_factory,
        controller_args=FAST_HEALTH,
        coordinator_args={"request-timeout-s": "2"},
    )
    try:
        model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "Go on."}], "ignore_eos": True}
        ok = httpx.post(f"{stack.base_url}/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200
        slow = httpx.post(
            f"{stack.base_url}/v1/chat/completions", json={**body, "max_tokens": 1800}, timeout=60
        )
        assert slow.status_code == 504, slow.text
        assert "timed out" in slow.json()["error"]["message"]
        wait_blocks_idle(stack.controller_address)
    finally:
        stack.stop()


def test_first_token_timeout_is_504_on_both_paths_and_frees_the_blocks(model_factory, tmp_path_factory):
    # prompts of 900 and 1400 tokens take tens of milliseconds to prefill on the small model; 10 ms
    # is too little for either, whether the prefill worker or the decode worker itself prefills
    stack = start_stack(
        model_factory("qwen3", "small"),
        tmp_path_factory,
        controller_args=FAST_HEALTH,
        coordinator_args={"first-token-timeout-s": "0.01", "local-prefill-threshold": "1000"},
    )
    try:
        model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        for length, where in ((1400, "prefill"), (900, "decode")):
            body = {"model": model, "prompt": [7 + i % 500 for i in range(length)], "max_tokens": 4}
            reply = httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=60)
            assert reply.status_code == 504, reply.text
            message = reply.json()["error"]["message"]
            assert ("prefill timed out" if where == "prefill" else "no first token within 0.01 s") in message
            assert where in message  # names the instance (prefill-0 / decode-0)
        wait_blocks_idle(stack.controller_address)
        assert httpx.get(f"{stack.base_url}/health", timeout=5).status_code == 200
    finally:
        stack.stop()
