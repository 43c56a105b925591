"""The cluster view across Redis data loss: two in-process controllers, real agents (workers'
membership) and a real watcher (a coordinator's view) over gRPC, and a Redis the test restarts empty.
The controller that takes the lease over the empty Redis must not publish a view that lacks the
instances that are still alive, and the state it writes back to Redis is complete again."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from redis.exceptions import RedisError

from pdmesh.config import ControllerConfig
from pdmesh.membership import ClusterViewData, InstanceInfoData, LoadData, Role
from pdmesh.rpc.controller_client import ClusterWatcher, InstanceAgent
from pdmesh.rpc.server import start_server
from services.controller.lease import connect, parse_holder
from services.controller.server import ControllerService, create_controller

pytestmark = pytest.mark.timeout(120)

LEASE_S = 0.6
FAST = {"heartbeat_interval_s": 0.1, "suspect_after_s": 1.0, "dead_after_s": 2.0, "lease_ttl_s": LEASE_S}
MEMBERS = {"prefill-0": Role.PREFILL, "decode-0": Role.DECODE}


def serves_both(view: ClusterViewData) -> bool:
    """The view routes as the one before the loss did: both instances healthy."""
    return {i.instance_id for i in view.healthy()} == set(MEMBERS)


async def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s}s"
        await asyncio.sleep(0.01)


async def recovered(services: list[ControllerService], watcher: ClusterWatcher, redis_url: str) -> bool:
    """The controller holding the lease in Redis acts, the watcher follows it, and the members are
    stored again."""
    redis = connect(redis_url)
    try:
        holder = parse_holder(await redis.get("pdmesh:ctl:lease"))
        stored = set(await redis.hkeys("pdmesh:ctl:instances"))
    except RedisError:  # not back yet
        return False
    finally:
        await redis.aclose()
    active = [s for s in services if s.active]
    return (
        holder is not None
        and [(s.address, s.leadership.token) for s in active] == [(holder.address, holder.token)]
        and watcher.controller_address == holder.address
        and stored == set(MEMBERS)
    )


@contextlib.asynccontextmanager
async def cluster(redis_url: str):
    """Two controllers, one agent per member (with a gRPC health server at its address, for the
    controllers' probes), and a watcher that records every view it gets."""
    services: list[ControllerService] = []
    agents: list[InstanceAgent] = []
    health_servers = []
    watcher = None
    try:
        for _ in range(2):
            config = ControllerConfig(host="127.0.0.1", port=0, redis_url=redis_url, **FAST)
            services.append(await create_controller(config))
        addresses = ",".join(s.address for s in services)
        for instance_id, role in MEMBERS.items():
            health_servers.append(await start_server(lambda server: None, []))
            address = f"127.0.0.1:{health_servers[-1].port}"
            info = InstanceInfoData(instance_id, role, address, "tcp://127.0.0.1:2", "tiny")
            agents.append(InstanceAgent(addresses, info, LoadData))
        for agent in agents:
            await agent.start(register_timeout_s=10)
        watcher = ClusterWatcher(addresses, "test")
        views: list[ClusterViewData] = []
        watcher.add_listener(views.append)
        await watcher.start()
        await watcher.wait_for(serves_both, 10)
        yield services, watcher, views
    finally:
        if watcher is not None:
            await watcher.stop()
        for agent in agents:
            await agent.stop(deregister=False)
        for service in services:
            await service.stop(grace_s=0.2)
        for server in health_servers:
            await server.stop(0)


@pytest.mark.parametrize("outage_s", [0.0, 2 * LEASE_S], ids=["short-outage", "outage-over-a-lease"])
def test_no_view_without_the_live_instances_after_an_empty_restart(own_redis_server, outage_s):
    async def main() -> None:
        async with cluster(own_redis_server.url) as (services, watcher, views):
            for _ in range(2):
                seen = len(views)
                await asyncio.to_thread(own_redis_server.stop)
                await asyncio.sleep(outage_s)
                await asyncio.to_thread(own_redis_server.start)
                # recovered: the lease holder acts, the watcher follows it, Redis has the state again
                deadline = time.monotonic() + 4 * LEASE_S + 5
                while not await recovered(services, watcher, own_redis_server.url):
                    assert time.monotonic() < deadline, "no recovery after the restart"
                    await asyncio.sleep(0.02)
                await watcher.wait_for(lambda v, n=seen: len(views) > n and serves_both(v), 5)
                lacking = [v.summary() for v in views[seen:] if not serves_both(v)]
                assert lacking == [], lacking

    asyncio.run(main())
