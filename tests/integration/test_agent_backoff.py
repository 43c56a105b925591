"""A worker's membership agent: it backs off while no controller can take it (a standby that points at
a crashed active whose lease has not run out must not make it re-register ten times a second), and a
load it cannot measure reaches the controller as unknown, not as an idle worker."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from pdmesh.config import ControllerConfig
from pdmesh.membership import InstanceInfoData, LoadData, Role
from pdmesh.rpc.controller_client import InstanceAgent
from services.controller.server import create_controller

pytestmark = pytest.mark.timeout(60)

WATCH_S = 3.0
# Backoff 0.1 s doubling (x0.8..1.2 jitter): at most ~6 attempts fit in 3 s; resetting it on every
# redirect gave one attempt per ~0.1 s (about 30).
MAX_ATTEMPTS = 10


def test_redirects_to_a_dead_active_keep_the_backoff(redis_url):
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter("pdmesh:ctl:*"):
        client.delete(key)
    client.set("pdmesh:ctl:fence", 1)  # a deployment that has run before: the first controller acts at once
    client.close()

    async def main() -> None:
        config = dict(host="127.0.0.1", port=0, redis_url=redis_url, lease_ttl_s=30.0)
        active = await create_controller(ControllerConfig(**config))
        standby = await create_controller(ControllerConfig(**config))
        agent = None
        try:
            assert active.active and not standby.active
            await active.abandon()  # crashed: its lease stays for 30 s and the standby names it
            info = InstanceInfoData("w-0", Role.DECODE, "127.0.0.1:1", model="tiny")
            agent = InstanceAgent(standby.address, info, LoadData)
            started = time.monotonic()
            await agent.start(register_timeout_s=WATCH_S)
            assert not agent.registered and time.monotonic() - started >= WATCH_S
            attempts = agent.failures
            assert 2 <= attempts <= MAX_ATTEMPTS, f"{attempts} Register attempts in {WATCH_S}s"
        finally:
            if agent is not None:
                await agent.stop(deregister=False)
            await standby.stop(grace_s=0.2)
            await active.leadership.close()

    asyncio.run(main())


def test_a_load_probe_that_fails_is_reported_unknown_not_idle():
    calls = {"n": 0}

    def load() -> LoadData:
        calls["n"] += 1
        if calls["n"] > 2:  # registered and one heartbeat with a load, then the probe breaks
            raise RuntimeError("engine stats unavailable")
        return LoadData(running=0, free_blocks=16, total_blocks=16)

    async def main() -> None:
        controller = await create_controller(
            ControllerConfig(host="127.0.0.1", port=0, heartbeat_interval_s=0.05)
        )
        info = InstanceInfoData("w-0", Role.DECODE, "127.0.0.1:1", model="tiny")
        agent = InstanceAgent(controller.address, info, load)
        try:
            await agent.start(register_timeout_s=5)
            deadline = time.monotonic() + 5
            while calls["n"] < 4:
                assert time.monotonic() < deadline, "no heartbeats"
                await asyncio.sleep(0.02)
            record = controller.membership.get("w-0")
            assert record.load.unknown and not record.load.idle()
            assert record.state.value == "healthy"
        finally:
            await agent.stop()
            await controller.stop(grace_s=0.2)

    asyncio.run(main())
