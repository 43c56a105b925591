"""Active/standby controllers in-process on a real Redis: a standby takes over within two lease
periods and keeps the view, clients follow the active one, a stale active's writes are refused, and
the administration calls (ratio, drain, flip) work and refuse bad input."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
import redis

from pdmesh.config import ControllerConfig
from pdmesh.membership import InstanceInfoData, InstanceState, LoadData, Role
from pdmesh.rpc.client import open_channel
from pdmesh.rpc.controller_client import ClusterWatcher, InstanceAgent
from pdmesh.rpc.controller_endpoints import active_from_error
from pdmesh.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from services.controller.server import create_controller
from services.controller.state import FencedOut

pytestmark = pytest.mark.timeout(60)

LEASE_S = 0.6
# The instances here are agents without a gRPC server at their address: health probes would find them
# failing and kill them every dead_after_s, so the probes wait longer than any test here runs.
FAST = {
    "heartbeat_interval_s": 0.1,
    "suspect_after_s": 1.0,
    "dead_after_s": 2.0,
    "lease_ttl_s": LEASE_S,
    "probe_interval_s": 60,
}


@pytest.fixture
def clean_redis(redis_url):
    """No controller state left over from another test."""
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter("pdmesh:ctl:*"):
        client.delete(key)
    client.close()
    return redis_url


class FakeActuator:
    """Records flips instead of calling a worker."""

    def __init__(self) -> None:
        self.flips: list[tuple[str, Role]] = []

    async def flip(self, instance: InstanceInfoData, new_role: Role) -> None:
        self.flips.append((instance.instance_id, new_role))


@contextlib.asynccontextmanager
async def controllers(redis_url: str | None, count: int = 2, **overrides):
    started = []
    actuator = FakeActuator()
    try:
        for _ in range(count):
            config = ControllerConfig(host="127.0.0.1", port=0, redis_url=redis_url, **{**FAST, **overrides})
            started.append(await create_controller(config, actuator=actuator))
        # the first one holds the lease; over a Redis without a fencing counter it settles first
        await wait_until(lambda: started[0].active, 2 * started[0].leadership.settle_s + 1)
        yield started, actuator
    finally:
        for controller in started:
            await controller.stop(grace_s=0.2)


def instance(instance_id: str, role: Role) -> InstanceInfoData:
    return InstanceInfoData(instance_id, role, "127.0.0.1:1", "tcp://127.0.0.1:2", "tiny")


async def wait_until(condition, timeout_s: float = 5.0) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def test_standby_takes_over_within_two_lease_periods_and_keeps_the_view(clean_redis):
    async def main() -> None:
        async with controllers(clean_redis) as ((a, b), _):
            assert a.active and not b.active
            both = f"{a.address},{b.address}"
            agents = [
                InstanceAgent(both, instance("prefill-0", Role.PREFILL), LoadData),
                InstanceAgent(both, instance("decode-0", Role.DECODE), LoadData),
            ]
            watcher = ClusterWatcher(f"{b.address},{a.address}")  # starts at the standby: redirected
            for agent in agents:
                await agent.start(register_timeout_s=5)
            await watcher.start()
            await watcher.wait_for(lambda v: v.has_healthy(Role.PREFILL, Role.DECODE), 5)
            assert watcher.controller_address == a.address
            await a.abandon()  # crash: the lease is not released, it runs out
            took = await wait_until(lambda: b.active, 5)
            assert took < 2 * LEASE_S + 0.3, took
            view = b.membership.view()
            assert {i.instance_id for i in view.instances} == {"prefill-0", "decode-0"}
            await watcher.wait_for(
                lambda v: watcher.controller_address == b.address and v.has_healthy(Role.PREFILL), 5
            )
            await wait_until(lambda: all(ag.controller_address == b.address for ag in agents), 5)
            await asyncio.sleep(3 * FAST["dead_after_s"] / 2)  # agents heartbeat to b: nobody dies
            assert len(b.membership.view().healthy()) == 2
            for agent in agents:
                await agent.stop()
            await watcher.stop()

    asyncio.run(main())


def test_stale_active_cannot_write(clean_redis):
    async def main() -> None:
        async with controllers(clean_redis) as ((a, b), _):
            a.membership.register(instance("prefill-0", Role.PREFILL))
            await a.leadership.flush()
            for task in a._tasks[:1]:  # a's lease loop stalls (a long pause): the lease runs out
                task.cancel()
            await wait_until(lambda: b.active, 5)
            assert b.leadership.token > a.leadership.token
            a.membership.register(instance("ghost-0", Role.DECODE))  # a still thinks it is active
            await a.leadership.flush()  # refused by the fencing check: a steps down
            assert not a.leadership.active
            with pytest.raises(FencedOut):
                await a.leadership.store.put_instance(
                    a.leadership.token or 1, instance("x", Role.DECODE), False
                )
            state = await b.leadership.store.load()
            assert [i.instance_id for i in state.instances] == ["prefill-0"]

    asyncio.run(main())


async def _call(address: str, method: str, request):
    async with open_channel(address) as channel:
        return await getattr(controller_pb2_grpc.ControllerStub(channel), method)(request, timeout=5)


async def _code(address: str, method: str, request) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _call(address, method, request)
    return info.value


def test_administration_and_standby_refusal(clean_redis):
    async def main() -> None:
        async with controllers(clean_redis) as ((a, b), actuator):
            for iid, role in [
                ("prefill-0", Role.PREFILL),
                ("prefill-1", Role.PREFILL),
                ("decode-0", Role.DECODE),
            ]:
                a.membership.register(instance(iid, role))
            refusal = await _code(b.address, "ListInstances", controller_pb2.ListInstancesRequest())
            assert (
                refusal.code() == grpc.StatusCode.FAILED_PRECONDITION
                and active_from_error(refusal) == a.address
            )

            bad = await _code(a.address, "SetRatio", controller_pb2.SetRatioRequest(ratio="2:x"))
            assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
            reply = await _call(a.address, "SetRatio", controller_pb2.SetRatioRequest(ratio="2:1"))
            assert reply.ratio == "2:1"
            missing = await _code(a.address, "Drain", controller_pb2.DrainRequest(instance_id="nope"))
            assert missing.code() == grpc.StatusCode.NOT_FOUND

            drained = await _call(a.address, "Drain", controller_pb2.DrainRequest(instance_id="prefill-1"))
            assert drained.instance.state == common_pb2.INSTANCE_STATE_DRAINING
            assert [i.instance_id for i in a.membership.view().healthy(Role.PREFILL)] == ["prefill-0"]
            await _call(a.address, "Undrain", controller_pb2.DrainRequest(instance_id="prefill-1"))
            assert a.membership.get("prefill-1").state == InstanceState.HEALTHY

            last = controller_pb2.FlipRoleRequest(instance_id="decode-0", role=common_pb2.ROLE_PREFILL)
            assert (await _code(a.address, "FlipRole", last)).code() == grpc.StatusCode.FAILED_PRECONDITION
            no_role = controller_pb2.FlipRoleRequest(instance_id="prefill-1")
            assert (await _code(a.address, "FlipRole", no_role)).code() == grpc.StatusCode.INVALID_ARGUMENT
            flip = controller_pb2.FlipRoleRequest(instance_id="prefill-1", role=common_pb2.ROLE_DECODE)
            flipped = await _call(a.address, "FlipRole", flip)
            assert flipped.instance.role == common_pb2.ROLE_DECODE
            assert flipped.instance.state == common_pb2.INSTANCE_STATE_HEALTHY
            assert actuator.flips == [("prefill-1", Role.DECODE)]

            await a.stop(grace_s=0.2)  # graceful: the lease is released, b takes over at once
            await wait_until(lambda: b.active, 3.0)  # at once when idle; a busy host may delay a turn
            assert str(b.roles.target) == "2:1"
            assert b.membership.get("prefill-1").role == Role.DECODE

    asyncio.run(main())


def test_a_flip_interrupted_by_the_active_controllers_death_is_finished_by_the_standby(clean_redis):
    async def main() -> None:
        async with controllers(clean_redis) as ((a, b), actuator):
            both = f"{a.address},{b.address}"
            busy = {"prefill-1": True}

            def load_of(instance_id: str):
                return lambda: LoadData(running=1 if busy.get(instance_id) else 0)

            agents = [
                InstanceAgent(both, instance(iid, role), load_of(iid))
                for iid, role in [
                    ("prefill-0", Role.PREFILL),
                    ("prefill-1", Role.PREFILL),
                    ("decode-0", Role.DECODE),
                ]
            ]
            for agent in agents:
                await agent.start(register_timeout_s=5)
            await wait_until(lambda: len(a.membership.view().healthy()) == 3)
            flip = controller_pb2.FlipRoleRequest(instance_id="prefill-1", role=common_pb2.ROLE_DECODE)
            flipping = asyncio.ensure_future(_call(a.address, "FlipRole", flip))
            await wait_until(lambda: a.membership.flip_target("prefill-1") == Role.DECODE)
            await a.leadership.flush()
            stored = await b.leadership.store.load()
            assert stored.flips == {"prefill-1": Role.DECODE} and "prefill-1" in stored.draining
            # a dies while prefill-1 drains: a crashed process writes nothing more
            a.leadership.step_down("crashed")
            await a.abandon()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await flipping
            await wait_until(lambda: b.active, 5)
            await asyncio.sleep(0.5)
            assert b.membership.get("prefill-1").state == InstanceState.DRAINING  # still waiting to drain
            assert actuator.flips == []
            busy["prefill-1"] = False  # its last request ends
            await wait_until(lambda: b.membership.get("prefill-1").role == Role.DECODE, 10)
            await wait_until(lambda: b.membership.get("prefill-1").state == InstanceState.HEALTHY)
            assert actuator.flips == [("prefill-1", Role.DECODE)]
            await wait_until(lambda: not b.membership.flip_targets())
            await b.leadership.flush()
            stored = await b.leadership.store.load()
            assert stored.flips == {} and not stored.draining
            assert {i.instance_id: i.role for i in stored.instances}["prefill-1"] == Role.DECODE
            for agent in agents:
                await agent.stop()

    asyncio.run(main())
