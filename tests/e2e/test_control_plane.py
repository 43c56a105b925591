"""The control plane with real processes: `pdmesh ctl flip` switches a worker's role in place, the
`auto` ratio follows prompt-heavy and decode-heavy load, and a standby controller takes over from an
active one killed with SIGKILL during a burst without any request failing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from pdmesh.launcher import ROOT
from pdmesh.rpc.client import open_channel
from pdmesh.v1 import controller_pb2, controller_pb2_grpc
from tests.e2e.conftest import start_stack
from tests.e2e.helpers import list_instances, wait_until

pytestmark = pytest.mark.timeout(240)

LEASE_S = 1.0
HEALTH = {
    "heartbeat-interval-s": "0.2",
    "suspect-after-s": "1.5",
    "dead-after-s": "3.0",
    "probe-interval-s": "0.5",
    "lease-ttl-s": str(LEASE_S),
}


def ctl(stack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "pdmesh.cli", "ctl", "--controller", stack.controller_address, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, env=env, cwd=ROOT)


def roles(stack) -> dict[str, str]:
    return {i.instance_id: i.role for i in _instances(stack)}


def _instances(stack):
    """ListInstances at whichever controller is active (the CLI follows; here we try each)."""
    for address in stack.controller_address.split(","):
        with contextlib.suppress(grpc.RpcError):
            return list_instances(address)
    raise AssertionError("no controller answered ListInstances")


def complete(stack, prompt: str, max_tokens: int, timeout: float = 60.0) -> httpx.Response:
    body = {
        "model": _model(stack),
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    return httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=timeout)


def _model(stack) -> str:
    return httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def ha_stack(tiny_qwen3, tmp_path_factory):
    stack = start_stack(
        tiny_qwen3, tmp_path_factory, prefill=2, decode=1, controllers=2, controller_args=HEALTH
    )
    try:
        yield stack
    finally:
        stack.stop()


def test_ctl_bad_input_exits_2(ha_stack):
    assert ctl(ha_stack, "set-ratio", "two").returncode == 2
    bad = ctl(ha_stack, "flip", "prefill-0", "sideways")
    assert bad.returncode == 2 and "bad role" in bad.stderr and len(bad.stderr.splitlines()) == 1
    assert ctl(ha_stack, "flip", "decode-0", "prefill").returncode == 1  # the last decode instance


def test_flip_prefill_to_decode_serves_the_new_role(ha_stack):
    done = ctl(ha_stack, "flip", "prefill-1", "decode")
    assert done.returncode == 0, done.stderr
    assert roles(ha_stack)["prefill-1"] == 2  # ROLE_DECODE
    listed = ctl(ha_stack, "list")
    assert listed.returncode == 0 and "prefill-1" in listed.stdout
    for _ in range(4):  # least-load decode routing reaches the flipped worker too
        assert complete(ha_stack, "The rain", 8).status_code == 200
    back = ctl(ha_stack, "flip", "prefill-1", "prefill")
    assert back.returncode == 0, back.stderr
    assert roles(ha_stack)["prefill-1"] == 1
    assert complete(ha_stack, "The rain", 8).status_code == 200


def _active(stack) -> str:
    """The active controller's address as ListInstances reports it ("" while none answers)."""
    for address in stack.controller_address.split(","):
        with contextlib.suppress(grpc.RpcError):
            return asyncio.run(_reply_active(address))
    return ""


async def _reply_active(address: str) -> str:
    async with open_channel(address) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        return (await stub.ListInstances(controller_pb2.ListInstancesRequest(), timeout=2)).active


def test_kill_active_controller_during_a_burst(ha_stack):
    active = _active(ha_stack)
    addresses = ha_stack.controller_address.split(",")
    name = ha_stack.controller_names[addresses.index(active)]
    stop = threading.Event()

    def client() -> list[int]:
        codes = []
        while not stop.is_set():
            codes.append(complete(ha_stack, "Tell me about the sea", 12).status_code)
        return codes

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client) for _ in range(3)]
        time.sleep(1.0)
        ha_stack.kill(name)  # SIGKILL: the lease is not released, it runs out
        took = wait_until(lambda: _active(ha_stack) not in ("", active), 10, "a standby taking over")
        time.sleep(3.0)  # longer than dead_after_s: nobody is declared dead wrongly
        stop.set()
        codes = [c for f in futures for c in f.result()]
    assert took < 2 * LEASE_S + 1.5, took
    assert codes and set(codes) == {200}, codes
    assert len(_instances(ha_stack)) == 3
    assert complete(ha_stack, "After the takeover", 8).status_code == 200


def test_auto_ratio_follows_the_load(tiny_qwen3, tmp_path_factory):
    args = {
        **HEALTH,
        "pd-ratio": "auto",
        "ratio-interval-s": "0.5",
        "flip-cooldown-s": "1",
        "prefill-capacity-tokens-per-s": "40",
        "decode-batch-capacity": "2",
    }
    stack = start_stack(tiny_qwen3, tmp_path_factory, prefill=1, decode=2, controller_args=args)
    stop = threading.Event()
    try:
        count = lambda role: sum(1 for r in roles(stack).values() if r == role)  # noqa: E731

        def load(prompt: str, max_tokens: int) -> None:
            while not stop.is_set():
                complete(stack, prompt, max_tokens)

        with ThreadPoolExecutor(3) as pool:
            heavy = [pool.submit(load, "rain " * 150, 1) for _ in range(3)]
            wait_until(lambda: count(1) == 2, 25, "a second prefill instance under prompt-heavy load")
            stop.set()
            [f.result() for f in heavy]
        stop.clear()
        with ThreadPoolExecutor(4) as pool:
            heavy = [pool.submit(load, "Hi", 48) for _ in range(4)]
            wait_until(lambda: count(1) == 1, 25, "back to one prefill instance under decode-heavy load")
            stop.set()
            [f.result() for f in heavy]
    finally:
        stop.set()
        stack.stop()
