"""Fencing across Redis data loss, with in-process controllers on a real Redis that the tests restart
empty (as `pdmesh up`'s Redis, without persistence): never two active controllers at once, fencing
tokens that only grow (also for a controller started after the loss), and a stale active that stops
acting by its own clock before a new one starts."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from redis.exceptions import RedisError

from pdmesh.config import ControllerConfig
from pdmesh.redis_server import RedisServer
from services.controller.lease import connect
from services.controller.server import ControllerService, create_controller

pytestmark = pytest.mark.timeout(90)

LEASE_S = 0.6
FAST = {"heartbeat_interval_s": 0.1, "suspect_after_s": 1.0, "dead_after_s": 2.0, "lease_ttl_s": LEASE_S}


@contextlib.asynccontextmanager
async def controllers(redis_url: str, count: int = 2):
    started: list[ControllerService] = []
    try:
        for _ in range(count):
            config = ControllerConfig(host="127.0.0.1", port=0, redis_url=redis_url, **FAST)
            started.append(await create_controller(config))
        yield started
    finally:
        for controller in started:
            await controller.stop(grace_s=0.2)


class Watch:
    """Samples every controller's state each few milliseconds: who acts, with which token."""

    def __init__(self, services: list[ControllerService]) -> None:
        self.services = services
        self.overlaps: list[tuple[str, ...]] = []
        self.tokens: list[int] = []  # fencing tokens in the order they were first seen acting
        self.owners: dict[int, str] = {}
        self.reused: list[int] = []  # tokens seen acting in two controllers
        self._task: asyncio.Task | None = None

    def sample(self) -> None:
        acting = [s for s in self.services if s.leadership.active]
        if len(acting) > 1:
            self.overlaps.append(tuple(f"{s.address}#{s.leadership.token}" for s in acting))
        for service in acting:
            token = service.leadership.token
            if token not in self.owners:
                self.owners[token] = service.address
                self.tokens.append(token)
            elif self.owners[token] != service.address:
                self.reused.append(token)

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.002)

    def __enter__(self) -> Watch:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc_info) -> None:
        self._task.cancel()


async def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s}s"
        await asyncio.sleep(0.01)


async def wait_recovered(services: list[ControllerService], timeout_s: float) -> None:
    """Until one controller acts and the lease in Redis is its own."""
    deadline = time.monotonic() + timeout_s
    while True:
        active, holder = one_active(services), None
        if active is not None:
            with contextlib.suppress(RedisError):  # a connection from before the restart fails once
                holder = await active.leadership.lease.holder()
            if holder is not None and (holder.address, holder.token) == (
                active.address,
                active.leadership.token,
            ):
                return
        assert time.monotonic() < deadline, f"no recovery within {timeout_s}s"
        await asyncio.sleep(0.01)


def one_active(services: list[ControllerService]) -> ControllerService | None:
    acting = [s for s in services if s.active]
    return acting[0] if len(acting) == 1 else None


async def restart_empty(server: RedisServer, outage_s: float = 0.0) -> None:
    """Stops Redis and starts it again on the same port with nothing in it (off the event loop: the
    controllers keep running meanwhile)."""
    await asyncio.to_thread(server.stop)
    if outage_s:
        await asyncio.sleep(outage_s)
    await asyncio.to_thread(server.start)


def test_empty_redis_restarts_never_give_two_actives_or_a_reused_token(own_redis_server):
    settle_bound = 2 * LEASE_S + 2  # a takeover over a lost counter: one lease to settle, one to take it

    async def main() -> None:
        async with controllers(own_redis_server.url) as services:
            with Watch(services) as watch:
                await wait_until(lambda: one_active(services), settle_bound, "a first active controller")
                for outage_s in (0.0, 0.0, 1.5 * LEASE_S, 0.0):
                    before = one_active(services)
                    await restart_empty(own_redis_server, outage_s)
                    standby = next(s for s in services if s is not before)
                    await standby.leadership.try_once()  # the standby tries first: it gets the lease
                    await wait_recovered(services, settle_bound)
            assert watch.overlaps == [], watch.overlaps[:3]
            assert watch.reused == []
            assert len(watch.tokens) >= 5 and watch.tokens == sorted(set(watch.tokens)), watch.tokens
            redis = connect(own_redis_server.url)
            assert int(await redis.get("pdmesh:ctl:fence")) == one_active(services).leadership.token
            await redis.aclose()

    asyncio.run(main())


def test_a_controller_started_after_the_loss_claims_a_larger_token(own_redis_server):
    async def main() -> None:
        async with controllers(own_redis_server.url, count=1) as (first,):
            await wait_until(lambda: first.active, 2 * LEASE_S + 2, "the first controller acting")
            old_token = first.leadership.token
        await restart_empty(own_redis_server)  # nobody remembers a token now but the clock
        async with controllers(own_redis_server.url, count=1) as (fresh,):
            await wait_until(lambda: fresh.active, 2 * LEASE_S + 2, "the new controller acting")
            assert fresh.leadership.token > old_token

    asyncio.run(main())


def test_a_stalled_active_stops_acting_before_a_standby_takes_over(own_redis_server):
    async def main() -> None:
        async with controllers(own_redis_server.url) as services:
            with Watch(services) as watch:
                await wait_until(lambda: one_active(services), 2 * LEASE_S + 2, "a first active controller")
                stalled = one_active(services)
                other = next(s for s in services if s is not stalled)
                stalled._tasks[0].cancel()  # its lease loop stops (a long pause): no renewal, no step-down
                await wait_until(lambda: other.active, 3 * LEASE_S, "the standby taking over")
                assert not stalled.active  # by its own clock, without having run its lease loop
            assert watch.overlaps == [], watch.overlaps[:3]

    asyncio.run(main())
