"""The controller lease on a real Redis: one holder, renewal, expiry, growing fencing tokens, and fenced
state writes refused for a stale token."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from pdmesh.membership import InstanceInfoData, Role
from services.controller.lease import LeaseLock, connect
from services.controller.state import ClusterStore, FencedOut

pytestmark = pytest.mark.timeout(30)


def run(coro):
    return asyncio.run(coro)


async def wait_for(condition, timeout_s: float, what: str) -> None:
    """Polls the async ``condition()`` every 10 ms; fails naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s}s"
        await asyncio.sleep(0.01)


async def wait_expired(redis, lock: LeaseLock) -> None:
    """Waits until Redis itself has dropped the lease key (its TTL ran out)."""
    ttl_s = lock.ttl_ms / 1000
    await wait_for(lambda: _gone(redis, lock.lease_key), 10 * ttl_s + 2, f"expiry of {lock.lease_key}")


async def _gone(redis, key: str) -> bool:
    return not await redis.exists(key)


async def _pttl_below(redis, key: str, limit_ms: float) -> bool:
    return 0 < await redis.pttl(key) < limit_ms


def test_one_holder_renew_expire_and_growing_tokens(redis_url):
    async def main() -> None:
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        redis = connect(redis_url)
        a = LeaseLock(redis, "a:1", ttl_s=1.0, prefix=prefix)
        b = LeaseLock(redis, "b:1", ttl_s=1.0, prefix=prefix)
        first = await a.acquire()
        assert first > 0 and await b.acquire() == 0
        assert (await b.holder()).address == "a:1" and (await b.holder()).token == first
        assert 0 < await redis.pttl(a.lease_key) <= a.ttl_ms
        # let Redis count down part of the lease, then renew: the TTL goes back up to the full lease
        await wait_for(lambda: _pttl_below(redis, a.lease_key, 0.7 * a.ttl_ms), 5, "lease countdown")
        before = await redis.pttl(a.lease_key)
        assert await a.renew()
        assert before < await redis.pttl(a.lease_key) <= a.ttl_ms
        assert await b.acquire() == 0  # the renewal kept it
        await wait_expired(redis, a)  # a stops renewing: the lease expires
        second = await b.acquire()
        assert second > first
        assert not await a.renew()  # a cannot take it back by renewing
        assert await b.release() and await b.holder() is None
        await redis.aclose()

    run(main())


def test_stale_token_cannot_write(redis_url):
    async def main() -> None:
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        redis = connect(redis_url)
        old = LeaseLock(redis, "old:1", ttl_s=0.2, prefix=prefix)
        new = LeaseLock(redis, "new:1", ttl_s=5, prefix=prefix)
        store = ClusterStore(redis, old.fence_key, prefix)
        old_token = await old.acquire()
        info = InstanceInfoData("p0", Role.PREFILL, "127.0.0.1:1")
        await store.put_instance(old_token, info, draining=False)
        await wait_expired(redis, old)
        new_token = await new.acquire()
        assert new_token > old_token
        with pytest.raises(FencedOut):
            await store.put_instance(old_token, InstanceInfoData("p1", Role.DECODE, "x:1"), draining=False)
        with pytest.raises(FencedOut):
            await store.delete_instance(old_token, "p0")
        await store.put_instance(new_token, info, draining=True)
        state = await store.load()
        assert [i.instance_id for i in state.instances] == ["p0"] and state.draining == {"p0"}
        await redis.aclose()

    run(main())
