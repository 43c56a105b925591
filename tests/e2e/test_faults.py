"""Failures during real traffic (real processes, real Redis): a client that goes away, a prefill
worker killed with SIGKILL, a decode worker killed mid-stream. Every accepted request completes,
every KV block returns to its pool and no KV handle key outlives its lease."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from tests.e2e.conftest import start_stack
from tests.e2e.helpers import instance_busy, stream_chat, wait_blocks_idle, wait_until

pytestmark = pytest.mark.timeout(240)

FAST_HEALTH = {"heartbeat-interval-s": "0.2", "suspect-after-s": "0.6", "dead-after-s": "1.2"}
LEASE_S = 10
MESSAGES = [{"role": "user", "content": "Write a long story about rain on a tin roof."}]


def body(stack, max_tokens: int) -> dict:
    model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    return {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def assert_handles_within_lease(stack) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    for key in client.scan_iter("pdmesh:kv:*"):
        ttl_ms = client.pttl(key)
        assert 0 < ttl_ms <= LEASE_S * 1000, f"{key!r} has TTL {ttl_ms} ms"


def burst(stack, n: int, max_tokens: int, during) -> list[tuple[str, list[dict], list[str]]]:
    """n concurrent streams; ``during()`` runs while they are sent and waits itself for its moment."""
    payload = body(stack, max_tokens)
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(stream_chat, stack.base_url, payload, 120) for _ in range(n)]
        during()
        return [f.result() for f in futures]


def kill_once_logged(stack, victim: str, needle: str) -> None:
    """SIGKILLs ``victim`` as soon as its log shows ``needle``: the moment it holds work of the burst."""
    wait_until(lambda: needle in stack.log_tail(victim, 50), 30, f"{needle!r} in {victim}'s log", poll_s=0.01)
    stack.kill(victim, signal.SIGKILL)


def test_client_disconnect_frees_blocks_within_a_second(model_factory, tmp_path_factory):
    stack = start_stack(model_factory("qwen3", "small"), tmp_path_factory, controller_args=FAST_HEALTH)
    try:
        with httpx.Client(timeout=60) as client:
            payload = {**body(stack, 1500), "stream": True}
            with client.stream("POST", f"{stack.base_url}/v1/chat/completions", json=payload) as response:
                lines = response.iter_lines()
                for _ in range(5):
                    next(lines)
                # leave only once the controller has seen decode-0 holding the request's blocks: an
                # idle heartbeat sent before its KV pull would otherwise pass the idle check below
                wait_until(lambda: instance_busy(stack.controller_address, "decode-0"), 10, "decode-0 busy")
        gone = time.monotonic()
        wait_until(lambda: "aborting in the engine" in stack.log_tail("decode-0", 200), 3, "the abort")
        wait_blocks_idle(stack.controller_address, timeout_s=3)
        assert time.monotonic() - gone < 1.5
    finally:
        stack.stop()


def test_prefill_worker_killed_during_burst(model_factory, tmp_path_factory):
    # the same prompt eight times: cache-aware routing sends all of them to prefill-0, which the small
    # model keeps busy over a few tenths of a second; it is killed once it has served the first one
    stack = start_stack(
        model_factory("qwen3", "small"), tmp_path_factory, prefill=2, decode=1, controller_args=FAST_HEALTH
    )
    try:
        results = burst(stack, 8, 48, during=lambda: kill_once_logged(stack, "prefill-0", "prefilled"))
        for _, chunks, payloads in results:
            assert payloads[-1] == "[DONE]"
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        retries = [line for line in stack.log_tail("coordinator", 400).splitlines() if "retrying" in line]
        assert retries, "no request was in flight at prefill-0 when it was killed"
        assert "prefilled" in stack.log_tail("prefill-1", 200)  # the survivor took them over
        wait_blocks_idle(stack.controller_address)
        assert_handles_within_lease(stack)
    finally:
        stack.stop()


def test_decode_worker_killed_mid_stream_migrates(model_factory, tmp_path_factory):
    # the small model decodes slowly enough here that the streams are still running at the kill
    stack = start_stack(
        model_factory("qwen3", "small"), tmp_path_factory, prefill=1, decode=2, controller_args=FAST_HEALTH
    )
    try:
        # decode-0 holds a stream once it has pulled a request's KV
        results = burst(stack, 6, 200, during=lambda: kill_once_logged(stack, "decode-0", "pulled"))
        reference, _, _ = stream_chat(stack.base_url, body(stack, 200))
        for text, chunks, payloads in results:
            assert payloads[-1] == "[DONE]"
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert text == reference
        assert "retrying" in stack.log_tail("coordinator", 400)
        wait_blocks_idle(stack.controller_address)
        assert_handles_within_lease(stack)
    finally:
        stack.stop()
