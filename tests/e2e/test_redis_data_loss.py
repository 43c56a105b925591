"""Redis restarted empty under a serving stack (real processes: two controllers, a prefill and a
decode worker, a coordinator, Redis without persistence as `pdmesh up` runs it), after the active
controller was killed: once Redis is back no request fails, the controller that takes over acts with
a larger fencing token, and no block or KV handle is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import redis

from pdmesh.rpc.client import open_channel
from pdmesh.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from tests.e2e.conftest import start_stack
from tests.e2e.helpers import wait_blocks_idle, wait_until

pytestmark = pytest.mark.timeout(240)

LEASE_S = 1.0
HEALTHY = common_pb2.INSTANCE_STATE_HEALTHY
HEALTH = {
    "heartbeat-interval-s": "0.2",
    "suspect-after-s": "1.5",
    "dead-after-s": "3.0",
    "probe-interval-s": "0.5",
    "lease-ttl-s": str(LEASE_S),
}


@pytest.fixture(scope="module")
def stack(tiny_qwen3, tmp_path_factory):
    stack = start_stack(
        tiny_qwen3, tmp_path_factory, prefill=1, decode=1, controllers=2, controller_args=HEALTH
    )
    try:
        yield stack
    finally:
        stack.stop()


class Clients:
    """Closed-loop clients recording (start time, status, error text) of every request."""

    def __init__(self, stack, count: int = 3) -> None:
        self.stack, self.count = stack, count
        self.results: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(count)
        self._futures = []

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = complete(self.stack)
                self.results.append((started, response.status_code, response.text[:200]))
            except httpx.HTTPError as exc:
                self.results.append((started, 0, repr(exc)))

    def __enter__(self) -> Clients:
        self._futures = [self._pool.submit(self._loop) for _ in range(self.count)]
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for future in self._futures:
            future.result()
        self._pool.shutdown()

    def ok_after(self, since: float) -> int:
        return sum(1 for started, status, _ in self.results if started >= since and status == 200)

    def failed(self, begin: float, end: float) -> list[tuple[int, str]]:
        """The requests that started in [begin, end) and did not succeed."""
        return [(status, text) for t, status, text in self.results if begin <= t < end and status != 200]


def complete(stack) -> httpx.Response:
    body = {
        "model": stack.spec.model_dir.name,
        "prompt": "The sea at night",
        "max_tokens": 8,
        "temperature": 0,
    }
    return httpx.post(f"{stack.base_url}/v1/completions", json={**body, "ignore_eos": True}, timeout=30)


def acting(stack) -> tuple[str, controller_pb2.ListInstancesResponse | None]:
    """The controller acting now and its ListInstances reply (("", None) while none acts: standbys
    and a controller still settling refuse the call)."""
    for address in stack.controller_address.split(","):
        with contextlib.suppress(grpc.RpcError):
            return address, asyncio.run(_list(address))
    return "", None


async def _list(address: str) -> controller_pb2.ListInstancesResponse:
    async with open_channel(address) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        return await stub.ListInstances(controller_pb2.ListInstancesRequest(), timeout=2)


def acting_token(stack) -> int:
    reply = acting(stack)[1]
    return reply.fencing_token if reply is not None else 0


def lease_token(stack) -> int:
    """The fencing token of the lease in Redis (0 when nobody holds it)."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        value = client.get("pdmesh:ctl:lease") or "0|"
    except redis.RedisError:
        value = "0|"
    finally:
        client.close()
    return int(value.partition("|")[0])


def recovered(stack) -> bool:
    """The lease holder since the restart acts and lists both workers healthy."""
    reply = acting(stack)[1]
    healthy = {i.instance_id for i in (reply.instances if reply else ()) if i.state == HEALTHY}
    return reply is not None and reply.fencing_token == lease_token(stack) and len(healthy) == 2


def kill_active_and_bring_it_back(stack) -> None:
    """SIGKILLs the acting controller, waits for the standby to act, restarts the killed one (standby)."""
    address = acting(stack)[0]
    name = stack.controller_names[stack.controller_address.split(",").index(address)]
    stack.kill(name)
    wait_until(lambda: acting(stack)[0] not in ("", address), 2 * LEASE_S + 5, "a standby taking over")
    stack.restart(name)


def kv_keys(stack) -> list[str]:
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        return list(client.scan_iter("pdmesh:kv:*"))
    finally:
        client.close()


def test_controller_kill_then_empty_redis_five_times(stack):
    """The operator's scenario of issue 20, five times: SIGKILL the active controller, then restart Redis
    empty (every other time after an outage longer than the lease, the other times at once)."""
    tokens, windows = [], []  # windows: from Redis being back to the next outage (or the end)
    with Clients(stack) as clients:
        wait_until(lambda: clients.ok_after(0) >= 3, 60, "requests served before the first cycle")
        tokens.append(acting_token(stack))
        for cycle in range(5):
            kill_active_and_bring_it_back(stack)
            tokens.append(acting_token(stack))
            stack.redis.stop()  # requests during the outage may fail, with a clear 503
            if windows:
                windows[-1][1] = time.monotonic()
            if cycle % 2:
                wait_until(lambda: acting_token(stack) == 0, 4 * LEASE_S + 5, "the lease running out")
            stack.redis.start()
            windows.append([time.monotonic(), float("inf")])
            wait_until(
                lambda: recovered(stack), 4 * LEASE_S + 10, f"a controller acting anew (cycle {cycle})"
            )
            tokens.append(acting_token(stack))
            since = time.monotonic()
            wait_until(lambda s=since: clients.ok_after(s) >= 3, 60, "requests served after recovery")
    failed = [(status, text) for begin, end in windows for status, text in clients.failed(begin, end)]
    assert failed == []
    assert tokens == sorted(set(tokens)), f"fencing tokens not strictly increasing: {tokens}"
    assert all(p.poll() is None for p in stack.processes.values()), "a service died"
    wait_blocks_idle(acting(stack)[0])
    wait_until(lambda: not kv_keys(stack), 10, "no pdmesh:kv:* key left")
