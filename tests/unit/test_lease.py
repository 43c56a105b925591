"""The controller lease on a real Redis: one holder, renewal, expiry, growing fencing tokens, and fenced
state writes refused for a stale token."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from pdmesh.cluster import InstanceInfoData, Role
from services.controller.lease import LeaseLock, connect
from services.controller.state import ClusterStore, FencedOut

pytestmark = pytest.mark.timeout(30)


def run(coro):
    return asyncio.run(coro)


def test_one_holder_renew_expire_and_growing_tokens(redis_url):
    async def main() -> None:
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        redis = connect(redis_url)
        a = LeaseLock(redis, "a:1", ttl_s=0.3, prefix=prefix)
        b = LeaseLock(redis, "b:1", ttl_s=0.3, prefix=prefix)
        first = await a.acquire()
        assert first > 0 and await b.acquire() == 0
        assert (await b.holder()).address == "a:1" and (await b.holder()).token == first
        await asyncio.sleep(0.2)
        assert await a.renew()
        await asyncio.sleep(0.2)
        assert await b.acquire() == 0  # the renewal kept it
        await asyncio.sleep(0.4)  # a stops renewing: the lease expires
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
        await asyncio.sleep(0.3)
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
