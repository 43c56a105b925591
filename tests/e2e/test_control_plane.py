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
DEAD_S = 3.0
HEALTH = {
    "heartbeat-interval-s": "0.2",
    "suspect-after-s": "1.5",
    "dead-after-s": str(DEAD_S),
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
    codes: list[int] = []

    def client() -> None:
        while not stop.is_set():
            codes.append(complete(ha_stack, "Tell me about the sea", 12).status_code)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client) for _ in range(3)]
        try:
            wait_until(lambda: len(codes) >= 3, 30, "the burst under way")
            ha_stack.kill(name)  # SIGKILL: the lease is not released, it runs out
            took = wait_until(lambda: _active(ha_stack) not in ("", active), 10, "a standby taking over")
            # the new active gives every instance a fresh grace period: through all of it (and a
            # heartbeat more) nobody may be declared dead while the burst goes on
            watch_until = time.monotonic() + DEAD_S + 1.0
            while time.monotonic() < watch_until:
                assert len(_instances(ha_stack)) == 3, [i.instance_id for i in _instances(ha_stack)]
                time.sleep(0.2)
        finally:
            stop.set()
        for future in futures:
            future.result()
    assert took < 2 * LEASE_S + 1.5, took
    assert codes and set(codes) == {200}, codes
    assert complete(ha_stack, "After the takeover", 8).status_code == 200


def _list_reply(stack) -> controller_pb2.ListInstancesResponse:
    for address in stack.controller_address.split(","):
        with contextlib.suppress(grpc.RpcError):
            return asyncio.run(_reply(address))
    raise AssertionError("no controller answered ListInstances")


async def _reply(address: str) -> controller_pb2.ListInstancesResponse:
    async with open_channel(address) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        return await stub.ListInstances(controller_pb2.ListInstancesRequest(), timeout=5)


def _prefill_count(stack) -> int:
    return sum(1 for i in _list_reply(stack).instances if i.role == 1)  # ROLE_PREFILL


def _load_until(stack, clients: int, prompt, max_tokens: int, prefill_wanted: int, timeout_s: float) -> list:
    """Closed-loop clients until the controller runs ``prefill_wanted`` prefill instances; returns every
    request's status. The clients stop whatever happens, so a failure never leaves them running."""
    stop = threading.Event()
    statuses: list[int] = []

    def client() -> None:
        while not stop.is_set():
            statuses.append(complete(stack, prompt, max_tokens).status_code)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client) for _ in range(clients)]
        try:
            deadline = time.monotonic() + timeout_s
            while _prefill_count(stack) != prefill_wanted:
                if time.monotonic() > deadline:
                    reply = _list_reply(stack)
                    raise AssertionError(
                        f"not {prefill_wanted} prefill instance(s) within {timeout_s}s: "
                        f"{[(i.instance_id, i.role) for i in reply.instances]}; "
                        f"last measured demand: {reply.demand or 'none'}; statuses so far {sorted(set(statuses))}"
                    )
                time.sleep(0.1)
        finally:
            stop.set()
        for future in futures:
            future.result()
    return statuses


def test_auto_ratio_follows_the_load(tiny_qwen3, tmp_path_factory):
    """Each phase is heavy by construction (see tests/unit/test_ratio.py for the operating points):
    150-token prompts with one output token, then 1-token prompts with 384 output tokens."""
    args = {
        **HEALTH,
        "pd-ratio": "auto",
        "ratio-interval-s": "0.5",
        "demand-window-s": "1",
        "flip-cooldown-s": "1",
        "prefill-capacity-tokens-per-s": "400",
        "decode-batch-capacity": "2",
    }
    stack = start_stack(tiny_qwen3, tmp_path_factory, prefill=1, decode=2, controller_args=args)
    try:
        statuses = _load_until(stack, 3, "rain " * 150, 1, prefill_wanted=2, timeout_s=25)
        assert statuses and set(statuses) == {200}, statuses
        statuses = _load_until(stack, 4, [7], 384, prefill_wanted=1, timeout_s=25)
        assert statuses and set(statuses) == {200}, statuses
    finally:
        stack.stop()
