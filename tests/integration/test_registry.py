"""The KV handle registry against a real redis-server: states, atomic claims, TTLs, outages."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis

from pdmesh.kv.registry import HandleUnavailable, KVError, KVRegistry, RedisKVRegistry, RegistryUnavailable
from pdmesh.kv.types import HandleState, KVHandle, KVLayout
from pdmesh.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)

LAYOUT = KVLayout("tiny", "mha", 2, 2, 8, 16, "float32", (2, 2, 16, 2, 8))


def make_handle(instance: str = "prefill-0", blocks: list[int] | None = None) -> KVHandle:
    request_id = f"req-{uuid.uuid4().hex[:6]}"
    return KVHandle(
        handle_id=f"{request_id}:{uuid.uuid4().hex[:8]}",
        request_id=request_id,
        prefill_instance=instance,
        transfer_endpoint="tcp://127.0.0.1:7001",
        block_ids=blocks if blocks is not None else [3, 7, 8],
        num_tokens=40,
        layout=LAYOUT,
        expires_at=time.time() + 30,
        prefill_address="127.0.0.1:9001",
        extra={"note": "x"},
        secret=uuid.uuid4().hex,
    )


async def pttl_ms(redis_url: str, registry: RedisKVRegistry, handle_id: str) -> int:
    """The handle key's remaining TTL as Redis itself reports it (-2: no such key)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        return await client.pttl(f"{registry.prefix}kv:{handle_id}")
    finally:
        await client.aclose()


async def wait_key_gone(redis_url: str, registry: RedisKVRegistry, handle_id: str) -> None:
    """Waits until Redis has expired the handle's key (the TTL really ran out, by Redis' clock)."""
    deadline = time.monotonic() + 10
    while await pttl_ms(redis_url, registry, handle_id) != -2:
        assert time.monotonic() < deadline, f"handle {handle_id} still in Redis after 10s"
        await asyncio.sleep(0.02)


def run_with_registry(redis_url: str, body) -> None:
    """Runs ``body(registry)`` in a fresh loop with a registry under a prefix of its own."""

    async def main() -> None:
        registry = RedisKVRegistry(redis_url, prefix=f"test-{uuid.uuid4().hex[:8]}:")
        try:
            await body(registry)
        finally:
            await registry.close()

    asyncio.run(main())


def test_implements_the_protocol(redis_url: str) -> None:
    async def body(registry: RedisKVRegistry) -> None:
        assert isinstance(registry, KVRegistry)

    run_with_registry(redis_url, body)


def test_register_then_get_round_trips(redis_url: str) -> None:
    async def body(registry: RedisKVRegistry) -> None:
        handle = make_handle()
        await registry.register(handle, ttl_s=30)
        got = await registry.get(handle.handle_id)
        assert got is not None and got.state == HandleState.READY
        for name in ("handle_id", "request_id", "prefill_instance", "transfer_endpoint", "block_ids", "num_tokens",
                     "layout", "prefill_address", "extra", "version", "secret"):  # fmt: skip
            assert getattr(got, name) == getattr(handle, name), name
        assert abs(got.expires_at - (time.time() + 30)) < 2
        assert await registry.get("no-such-handle") is None

    run_with_registry(redis_url, body)


def test_claim_once_then_refused(redis_url: str) -> None:
    async def body(registry: RedisKVRegistry) -> None:
        handle = make_handle()
        await registry.register(handle, ttl_s=30)
        claimed = await registry.claim(handle.handle_id, "decode-0", ttl_s=10)
        assert claimed.state == HandleState.CLAIMED and claimed.block_ids == handle.block_ids
        assert claimed.secret == handle.secret  # the puller presents it to the prefill's transfer server
        assert abs(claimed.expires_at - (time.time() + 10)) < 2  # the claim renewed the lease
        with pytest.raises(HandleUnavailable, match="already claimed by decode-0"):
            await registry.claim(handle.handle_id, "decode-1", ttl_s=10)
        with pytest.raises(HandleUnavailable, match="missing or expired"):
            await registry.claim("no-such-handle", "decode-1", ttl_s=10)

    run_with_registry(redis_url, body)


def test_claim_after_ttl_expiry_is_refused(redis_url: str) -> None:
    async def body(registry: RedisKVRegistry) -> None:
        handle = make_handle()
        await registry.register(handle, ttl_s=0.2)
        await wait_key_gone(redis_url, registry, handle.handle_id)
        with pytest.raises(HandleUnavailable, match="expired"):
            await registry.claim(handle.handle_id, "decode-0", ttl_s=10)
        assert await registry.get(handle.handle_id) is None
        assert await registry.instance_handles(handle.prefill_instance) == []

    run_with_registry(redis_url, body)


def test_renew_extends_a_claimed_lease(redis_url: str) -> None:
    async def body(registry: RedisKVRegistry) -> None:
        handle = make_handle()
        await registry.register(handle, ttl_s=30)
        await registry.claim(handle.handle_id, "decode-0", ttl_s=5)
        assert 0 < await pttl_ms(redis_url, registry, handle.handle_id) <= 5000  # the claim set the lease
        assert await registry.renew(handle.handle_id, ttl_s=20)
        assert 5000 < await pttl_ms(redis_url, registry, handle.handle_id) <= 20000  # and renew moved it on
        got = await registry.get(handle.handle_id)
        assert got.state == HandleState.CLAIMED and got.expires_at > time.time() + 5
        assert not await registry.renew("no-such-handle", ttl_s=1)

    run_with_registry(redis_url, body)


def test_release_then_claim_and_renew_refused(redis_url: str) -> None:
    async def body(registry: RedisKVRegistry) -> None:
        handle = make_handle()
        await registry.register(handle, ttl_s=30)
        await registry.claim(handle.handle_id, "decode-0", ttl_s=10)
        assert await registry.release(handle.handle_id)
        got = await registry.get(handle.handle_id)
        assert got is not None and got.state == HandleState.RELEASED  # kept for the prefill reaper
        assert not await registry.release(handle.handle_id)
        assert not await registry.renew(handle.handle_id, ttl_s=10)
        with pytest.raises(HandleUnavailable, match="RELEASED"):
            await registry.claim(handle.handle_id, "decode-1", ttl_s=10)
        unclaimed = make_handle()
        await registry.register(unclaimed, ttl_s=30)
        assert await registry.release(unclaimed.handle_id)  # READY -> RELEASED is allowed too

    run_with_registry(redis_url, body)


def test_released_handle_keeps_only_a_short_ttl(redis_url: str) -> None:
    async def main() -> None:
        registry = RedisKVRegistry(redis_url, prefix=f"test-{uuid.uuid4().hex[:8]}:", released_ttl_s=0.2)
        try:
            handle = make_handle()
            await registry.register(handle, ttl_s=30)
            await registry.release(handle.handle_id)
            assert 0 < await pttl_ms(redis_url, registry, handle.handle_id) <= 200
            await wait_key_gone(redis_url, registry, handle.handle_id)
            assert await registry.get(handle.handle_id) is None
        finally:
            await registry.close()

    asyncio.run(main())


def test_instance_index_and_forget(redis_url: str) -> None:
    async def body(registry: RedisKVRegistry) -> None:
        mine = [make_handle("prefill-a") for _ in range(3)]
        other = make_handle("prefill-b")
        for handle in [*mine, other]:
            await registry.register(handle, ttl_s=30)
        assert sorted(await registry.instance_handles("prefill-a")) == sorted(h.handle_id for h in mine)
        assert await registry.instance_handles("prefill-b") == [other.handle_id]
        await registry.forget(mine[0].handle_id)
        await registry.forget(mine[0].handle_id)  # idempotent
        assert await registry.get(mine[0].handle_id) is None
        assert sorted(await registry.instance_handles("prefill-a")) == sorted(h.handle_id for h in mine[1:])
        assert await registry.instance_handles("prefill-none") == []

    run_with_registry(redis_url, body)


def test_invalidate_instance_makes_claims_fail(redis_url: str) -> None:
    async def body(registry: RedisKVRegistry) -> None:
        ready, claimed, released = (make_handle("prefill-dead") for _ in range(3))
        survivor = make_handle("prefill-alive")
        for handle in (ready, claimed, released, survivor):
            await registry.register(handle, ttl_s=30)
        await registry.claim(claimed.handle_id, "decode-0", ttl_s=10)
        await registry.release(released.handle_id)
        assert await registry.invalidate_instance("prefill-dead") == 2
        for handle in (ready, claimed):
            assert (await registry.get(handle.handle_id)).state == HandleState.EXPIRED
            with pytest.raises(HandleUnavailable, match="invalidated"):
                await registry.claim(handle.handle_id, "decode-1", ttl_s=10)
        assert not await registry.renew(claimed.handle_id, ttl_s=10)
        assert (await registry.get(released.handle_id)).state == HandleState.RELEASED
        assert (await registry.claim(survivor.handle_id, "decode-1", ttl_s=10)).state == HandleState.CLAIMED
        assert await registry.invalidate_instance("prefill-dead") == 0

    run_with_registry(redis_url, body)


def test_concurrent_claims_exactly_one_wins(redis_url: str) -> None:
    async def main() -> None:
        prefix = f"test-{uuid.uuid4().hex[:8]}:"
        registries = [RedisKVRegistry(redis_url, prefix=prefix) for _ in range(3)]
        try:
            for _ in range(5):
                handle = make_handle()
                await registries[0].register(handle, ttl_s=30)
                claims = [
                    registries[i % 3].claim(handle.handle_id, f"decode-{i}", ttl_s=10) for i in range(24)
                ]  # fmt: skip
                results = await asyncio.gather(*claims, return_exceptions=True)
                winners = [r for r in results if isinstance(r, KVHandle)]
                assert len(winners) == 1
                assert all(isinstance(r, HandleUnavailable) for r in results if not isinstance(r, KVHandle))
                got = await registries[1].get(handle.handle_id)
                assert got.state == HandleState.CLAIMED
        finally:
            for registry in registries:
                await registry.close()

    asyncio.run(main())


def test_redis_outage_raises_promptly_then_recovers() -> None:
    server = RedisServer()
    server.start()
    port = server.port

    async def main() -> None:
        registry = RedisKVRegistry(server.url)
        try:
            handle = make_handle()
            await registry.register(handle, ttl_s=30)
            server.stop()
            for call in (
                registry.get(handle.handle_id),
                registry.claim(handle.handle_id, "d", 10),
                registry.register(make_handle(), 30),
            ):
                started = time.monotonic()
                with pytest.raises(RegistryUnavailable, match="unreachable") as info:
                    await call
                assert isinstance(info.value, KVError)
                assert time.monotonic() - started < 5.0
            server.start()
            assert server.port == port
            fresh = make_handle()
            await registry.register(fresh, ttl_s=30)  # no persistence: the old handle is gone
            assert (await registry.claim(fresh.handle_id, "decode-0", ttl_s=10)).state == HandleState.CLAIMED
            assert await registry.get(handle.handle_id) is None
        finally:
            await registry.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()
