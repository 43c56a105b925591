"""The controller over real gRPC on loopback: agents register and heartbeat, watchers follow the view,
silence makes an instance suspect then dead, bad input is refused, and the process stops on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from pdmesh.config import ControllerConfig
from pdmesh.membership import ClusterViewData, InstanceInfoData, InstanceState, LoadData, Role
from pdmesh.ports import free_port
from pdmesh.rpc.client import check_health, open_channel, wait_healthy
from pdmesh.rpc.controller_client import ClusterWatcher, InstanceAgent
from pdmesh.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from services.controller.server import create_controller

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
FAST = {"heartbeat_interval_s": 0.1, "suspect_after_s": 0.4, "dead_after_s": 0.8}


def config(port: int = 0, **timings: float) -> ControllerConfig:
    return ControllerConfig(host="127.0.0.1", port=port, **{**FAST, **timings})


def instance(instance_id: str = "prefill-0", role: Role = Role.PREFILL) -> InstanceInfoData:
    return InstanceInfoData(instance_id, role, "127.0.0.1:6001", "tcp://127.0.0.1:7001", "tiny")


def state_of(view: ClusterViewData, instance_id: str) -> InstanceState | None:
    found = view.get(instance_id)
    return found.state if found else None


def healthy(instance_id: str):
    return lambda view: state_of(view, instance_id) == InstanceState.HEALTHY


def gone(instance_id: str):
    return lambda view: view.get(instance_id) is None


async def wait_until(condition, timeout_s: float = 5.0) -> None:
    """Polls ``condition()`` (for state that lives outside the view, like an agent's counters)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_controller(**kwargs):
    """An in-process controller on a free port (or ``port=``), stopped however the test ends."""
    hook = kwargs.pop("on_instance_dead", None)
    controller = await create_controller(config(**kwargs), on_instance_dead=hook)
    try:
        yield controller
    finally:
        await controller.stop()


async def list_instances(address: str) -> list:
    async with open_channel(address) as channel:
        reply = await controller_pb2_grpc.ControllerStub(channel).ListInstances(
            controller_pb2.ListInstancesRequest(), timeout=2
        )
    return list(reply.instances)


def test_agent_registers_heartbeats_and_watcher_follows():
    async def main() -> None:
        async with running_controller() as controller:
            watcher = ClusterWatcher(controller.address, "test")
            seen: list[ClusterViewData] = []
            watcher.add_listener(seen.append)
            await watcher.start()
            assert watcher.connected and watcher.view.instances == ()
            agent = InstanceAgent(controller.address, instance(), lambda: LoadData(running=2, total_blocks=8))
            await agent.start(register_timeout_s=5)
            assert agent.registered and agent.heartbeat_interval_s == pytest.approx(0.1)
            view = await watcher.wait_for(healthy("prefill-0"), 5)
            got = view.get("prefill-0")
            assert got.role == Role.PREFILL and got.address == "127.0.0.1:6001" and got.model == "tiny"
            assert view.has_healthy(Role.PREFILL) and not view.has_healthy(Role.PREFILL, Role.DECODE)
            versions = [v.version for v in seen]
            assert versions and versions == sorted(versions)
            # heartbeats keep it alive past suspect_after_s: wait for one that lands later than that
            # after the join, then no view may ever have shown it suspect
            joined = controller.membership.get("prefill-0").last_heartbeat
            suspect_after_s = FAST["suspect_after_s"]
            await wait_until(
                lambda: controller.membership.get("prefill-0").last_heartbeat - joined > suspect_after_s
            )
            assert controller.membership.get("prefill-0").state == InstanceState.HEALTHY
            assert all(state_of(v, "prefill-0") != InstanceState.SUSPECT for v in seen)
            [listed] = await list_instances(controller.address)
            assert listed.load.running == 2 and listed.load.total_blocks == 8
            await agent.stop()
            await watcher.stop()

    asyncio.run(main())


def test_silent_instance_turns_suspect_then_dies():
    async def main() -> None:
        dead: list[str] = []
        async with running_controller(on_instance_dead=dead.append) as controller:
            watcher = ClusterWatcher(controller.address)
            await watcher.start()
            agent = InstanceAgent(controller.address, instance("decode-0", Role.DECODE), LoadData)
            await agent.start(register_timeout_s=5)
            await watcher.wait_for(healthy("decode-0"), 5)
            await agent.stop(deregister=False)  # the heartbeats just stop, as when a worker hangs or dies
            started = time.monotonic()
            await watcher.wait_for(lambda v: state_of(v, "decode-0") == InstanceState.SUSPECT, 5)
            suspect_s = time.monotonic() - started
            assert watcher.view.healthy(Role.DECODE) == []
            await watcher.wait_for(gone("decode-0"), 5)
            dead_s = time.monotonic() - started
            assert 0.1 < suspect_s < dead_s < 3.0, (suspect_s, dead_s)
            await wait_until(lambda: dead)  # the hook runs as a task after the sweep that removed it
            assert dead == ["decode-0"]
            await watcher.stop()

    asyncio.run(main())


def test_deregister_removes_at_once():
    async def main() -> None:
        async with running_controller(suspect_after_s=10, dead_after_s=20) as controller:
            watcher = ClusterWatcher(controller.address)
            await watcher.start()
            agent = InstanceAgent(controller.address, instance(), LoadData)
            await agent.start(register_timeout_s=5)
            await watcher.wait_for(healthy("prefill-0"), 5)
            await agent.stop()
            await watcher.wait_for(gone("prefill-0"), 1.0)
            assert await list_instances(controller.address) == []
            await watcher.stop()

    asyncio.run(main())


def test_forgotten_agent_registers_again():
    async def main() -> None:
        async with running_controller() as controller:
            agent = InstanceAgent(controller.address, instance(), LoadData)
            await agent.start(register_timeout_s=5)
            controller.membership.deregister("prefill-0")  # as after a controller restart
            await wait_until(lambda: agent.registrations == 2)
            assert controller.membership.get("prefill-0") is not None
            await agent.stop()

    asyncio.run(main())


def test_agent_started_before_the_controller_registers_when_it_comes():
    async def main() -> None:
        port = free_port()
        agent = InstanceAgent(f"127.0.0.1:{port}", instance(), LoadData)
        await agent.start(register_timeout_s=0.3)  # returns without raising; keeps trying
        assert not agent.registered
        async with running_controller(port=port) as controller:
            await wait_until(lambda: agent.registered)
            assert controller.membership.get("prefill-0") is not None
            await agent.stop()

    asyncio.run(main())


async def _expect_invalid(call, request, *words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(request, timeout=2)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in info.value.details()


def test_bad_input_is_refused_and_the_server_keeps_serving():
    async def main() -> None:
        async with running_controller() as controller:
            good = common_pb2.InstanceInfo(
                instance_id="d0", role=common_pb2.ROLE_DECODE, address="127.0.0.1:1"
            )
            async with open_channel(controller.address) as channel:
                stub = controller_pb2_grpc.ControllerStub(channel)
                bad = controller_pb2.RegisterRequest
                await _expect_invalid(stub.Register, bad(), "instance is missing")
                no_id = common_pb2.InstanceInfo(role=common_pb2.ROLE_DECODE, address="127.0.0.1:1")
                await _expect_invalid(stub.Register, bad(instance=no_id), "instance_id is empty")
                no_role = common_pb2.InstanceInfo(instance_id="d0", address="127.0.0.1:1")
                await _expect_invalid(stub.Register, bad(instance=no_role), "ROLE_UNSPECIFIED")
                no_address = common_pb2.InstanceInfo(instance_id="d0", role=common_pb2.ROLE_DECODE)
                await _expect_invalid(stub.Register, bad(instance=no_address), "address is empty")
                await _expect_invalid(
                    stub.Heartbeat, controller_pb2.HeartbeatRequest(), "instance_id is empty"
                )
                await _expect_invalid(
                    stub.Deregister, controller_pb2.DeregisterRequest(), "instance_id is empty"
                )
                assert controller.membership.version == 0
                reply = await stub.Register(bad(instance=good), timeout=2)
                assert reply.heartbeat_interval_ms == 100
                beat = await stub.Heartbeat(controller_pb2.HeartbeatRequest(instance_id="nobody"), timeout=2)
                assert beat.known is False
            assert [i.instance_id for i in await list_instances(controller.address)] == ["d0"]

    asyncio.run(main())


def test_health_service_answers_serving_and_stop_is_prompt():
    async def main() -> None:
        async with running_controller() as controller:
            watcher = ClusterWatcher(controller.address)
            await watcher.start()  # an open WatchCluster stream must not hold the stop up
            async with open_channel(controller.address) as channel:
                assert await check_health(channel)
                assert await check_health(channel, "pdmesh.v1.Controller")
            started = time.monotonic()
        assert time.monotonic() - started < 1.5
        await watcher.stop()

    asyncio.run(main())


def spawn_controller(port: int) -> subprocess.Popen:
    args = [
        "--port",
        str(port),
        *(arg for name, value in FAST.items() for arg in (f"--{name.replace('_', '-')}", str(value))),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "services.controller", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def stop_with_sigterm(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(proc.wait, 10)


def test_process_stops_on_sigterm_and_watcher_rides_out_a_restart():
    async def main() -> None:
        port = free_port()
        address = f"127.0.0.1:{port}"
        proc = spawn_controller(port)
        watcher = ClusterWatcher(address)
        agent = InstanceAgent(address, instance(), LoadData)
        try:
            await wait_healthy(address, timeout_s=20)
            await watcher.start()
            await agent.start(register_timeout_s=5)
            await watcher.wait_for(healthy("prefill-0"), 5)

            started = time.monotonic()
            assert await stop_with_sigterm(proc) == 0, proc.stderr.read().decode()
            assert time.monotonic() - started < 5
            await watcher.wait_for(lambda v: not watcher.connected, 5)
            # the scenario is time passing with no controller: nothing can be waited for, so sleep past
            # dead_after_s (plus two heartbeat periods) and check that the last view stayed put meanwhile
            await asyncio.sleep(FAST["dead_after_s"] + 2 * FAST["heartbeat_interval_s"])
            assert not watcher.connected and healthy("prefill-0")(watcher.view)

            proc = spawn_controller(port)
            await watcher.wait_for(lambda v: watcher.connected and healthy("prefill-0")(v), 20)
            await wait_until(lambda: agent.registrations >= 2)  # it came back by registering again
        finally:
            await agent.stop()
            await watcher.stop()
            if proc.poll() is None:
                assert await stop_with_sigterm(proc) == 0

    asyncio.run(main())
