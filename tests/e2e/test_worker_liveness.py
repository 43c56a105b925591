"""A worker keeps breathing while it computes: during a prefill step of several seconds its heartbeats
keep their period and the controller never suspects it, and a client that leaves during that step
gets every block and handle freed once the step ends.

Health timings are short (suspect after 1 s, dead after 2 s) and one prefill step is long (6000
tokens on the small preset in one step: about 2.5 s here), so a worker whose event loop waited for
the engine would be declared suspect, then dead, in the middle of the prefill.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from pdmesh.membership import InstanceState
from pdmesh.rpc.convert_cluster import instance_from_proto
from tests.e2e.conftest import start_stack
from tests.e2e.helpers import list_instances, wait_blocks_idle, wait_until

pytestmark = pytest.mark.timeout(180)

HEARTBEAT_S, SUSPECT_S = 0.2, 1.0
HEALTH = {
    "heartbeat-interval-s": str(HEARTBEAT_S),
    "suspect-after-s": str(SUSPECT_S),
    "dead-after-s": "2.0",
    "probe-interval-s": "0.2",
}
PROMPT = [5 + i % 200 for i in range(6000)]  # one step: max-prefill-tokens is above it


@pytest.fixture(scope="module")
def stack(model_factory, tmp_path_factory) -> Iterator:
    model = model_factory("qwen3", "small", max_position_embeddings=8192)
    worker_args = {"kv-cache-memory-mib": "128", "max-prefill-tokens": "8192"}
    stack = start_stack(model, tmp_path_factory, controller_args=HEALTH, worker_args=worker_args)
    try:
        yield stack
    finally:
        stack.stop()


def _body(stack, max_tokens: int, stream: bool = False) -> dict:
    model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def _prefill(stack):
    (info,) = [instance_from_proto(i) for i in list_instances(stack.controller_address)
               if i.instance_id == "prefill-0"]  # fmt: skip
    return info


def _computing(info) -> bool:
    """The worker holds a prompt it has not finished prefilling."""
    return info.load.queued_prefill_tokens > 0 or info.load.waiting > 0 or info.load.running > 0


def test_heartbeats_keep_their_period_during_a_long_prefill(stack):
    done = threading.Event()
    result: dict = {}

    def send() -> None:
        try:
            result["response"] = httpx.post(
                f"{stack.base_url}/v1/completions", json=_body(stack, 2), timeout=120
            )
        finally:
            done.set()

    samples = []
    sender = threading.Thread(target=send)
    sender.start()
    while not done.is_set():
        samples.append(_prefill(stack))
        time.sleep(0.05)
    sender.join()

    assert result["response"].status_code == 200, result["response"].text
    busy = [s for s in samples if _computing(s)]
    assert len(busy) >= 10, f"the prefill was seen in {len(busy)} samples only: not a long step"
    states = {s.state for s in samples}
    assert states == {InstanceState.HEALTHY}, f"prefill-0 was {states} during its prefill"
    beats = sorted({s.last_heartbeat for s in busy})
    gaps = [b - a for a, b in zip(beats, beats[1:], strict=False)]
    assert len(beats) >= 5 and max(gaps) < SUSPECT_S, f"heartbeat gaps while busy: {gaps}"
    assert "is suspect" not in stack.log_tail("controller", lines=500)


def _post_raw(stack, body: dict) -> socket.socket:
    """Sends a request over a plain socket (so that the test can hang up whenever it likes)."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {stack.spec.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((stack.spec.host, stack.http_port), timeout=10)
    sock.sendall(head + payload)
    return sock


def test_a_client_leaving_during_the_prefill_frees_everything(stack):
    body = {**_body(stack, 4, stream=True), "prompt": [7 + i % 190 for i in range(6000)]}  # not cached
    sock = _post_raw(stack, body)
    try:
        wait_until(lambda: _computing(_prefill(stack)), 30, "prefill-0 computing the prompt")
    finally:
        sock.close()  # the client leaves in the middle of the prefill step
    wait_blocks_idle(stack.controller_address)
    keys = list(redis.Redis.from_url(stack.redis_url).scan_iter("pdmesh:kv:*"))
    assert keys == [], f"KV handles left behind: {keys}"
    # cancelled mid-step (the usual case), or the step won the race on a loaded machine and the
    # handle it registered was released: either way the blocks were freed above
    log = stack.log_tail("prefill-0", lines=200)
    assert "aborting in the engine" in log or "pinned blocks" in log, log
    assert "is suspect" not in stack.log_tail("controller", lines=500)
    hi = {**_body(stack, 2), "prompt": "Hi"}
    after = httpx.post(f"{stack.base_url}/v1/completions", json=hi, timeout=60)
    assert after.status_code == 200, after.text
