"""The KV handle registry: which prefilled KV exists, where, and who may read it (Redis).

A handle is a hash ``{prefix}kv:{handle_id}`` with a TTL and a versioned schema (field ``v``). Its
state goes READY -> CLAIMED -> RELEASED, or to EXPIRED when its prefill instance is invalidated
(field ``reason`` says why). Every transition is one Lua script, so two decode workers can never
both claim a handle. Each prefill instance has an index ``{prefix}kvidx:{instance}``, a sorted set
of its handle ids scored by expiry (Redis clock, milliseconds), so that its death can be cleaned up.

Connection problems surface as ``RegistryUnavailable`` after a few quick retries; the client
reconnects by itself on later calls once Redis is back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable
from typing import Protocol, TypeVar, runtime_checkable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pdmesh.kv.redis_client import mask_url
from pdmesh.kv.types import HANDLE_SCHEMA_VERSION, HandleState, KVHandle, KVLayout, KVPart

log = logging.getLogger(__name__)

T = TypeVar("T")

RELEASED_TTL_S = 10.0  # how long a released/invalidated handle stays visible to the prefill reaper
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, BusyLoadingError)


class KVError(Exception):
    """Base class of the registry's errors."""


class HandleUnavailable(KVError):
    """The handle cannot be claimed: missing, expired, already claimed or released, invalidated."""

    def __init__(self, handle_id: str, reason: str) -> None:
        super().__init__(f"KV handle {handle_id} unavailable: {reason}")
        self.handle_id = handle_id
        self.reason = reason


class RegistryUnavailable(KVError):
    """Redis could not be reached (after retries)."""


@runtime_checkable
class KVRegistry(Protocol):
    """What the workers need from the registry; ``RedisKVRegistry`` is the implementation."""

    async def register(self, handle: KVHandle, ttl_s: float) -> None: ...
    async def claim(self, handle_id: str, claimer: str, ttl_s: float) -> KVHandle: ...
    async def renew(self, handle_id: str, ttl_s: float) -> bool: ...
    async def release(self, handle_id: str) -> bool: ...
    async def get(self, handle_id: str) -> KVHandle | None: ...
    async def instance_handles(self, instance_id: str) -> list[str]: ...
    async def invalidate_instance(self, instance_id: str) -> int: ...
    async def forget(self, handle_id: str) -> None: ...
    async def close(self) -> None: ...


# Shared by every script: the Redis clock in ms, and an expiry formatted as unix seconds.
_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function secs(ms) return string.format('%.3f', ms / 1000) end
"""

# KEYS: hash, index. ARGV: ttl_ms, handle_id, field, value, ...
_REGISTER = """
local ttl = tonumber(ARGV[1])
local now = now_ms()
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'READY', 'expires_at', secs(now + ttl), unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[2])
return now + ttl
"""

# KEYS: hash. ARGV: claimer, ttl_ms, index prefix, handle_id. -> {1, hgetall} | {0, reason}
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, 'missing or expired'} end
if state == 'CLAIMED' then
  return {0, 'already claimed by ' .. (redis.call('HGET', KEYS[1], 'claimer') or '?')}
end
if state ~= 'READY' then
  local reason = redis.call('HGET', KEYS[1], 'reason')
  if reason then return {0, state .. ' (' .. reason .. ')'} end
  return {0, 'already ' .. state}
end
local ttl = tonumber(ARGV[2])
local exp = now_ms() + ttl
redis.call('HSET', KEYS[1], 'state', 'CLAIMED', 'claimer', ARGV[1], 'expires_at', secs(exp))
redis.call('PEXPIRE', KEYS[1], ttl)
local inst = redis.call('HGET', KEYS[1], 'prefill_instance')
if inst then redis.call('ZADD', ARGV[3] .. inst, 'XX', exp, ARGV[4]) end
return {1, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: hash. ARGV: ttl_ms, index prefix, handle_id, new state or '' (keep). -> 1 | 0
_EXTEND = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'READY' and state ~= 'CLAIMED' then return 0 end
local ttl = tonumber(ARGV[1])
local exp = now_ms() + ttl
redis.call('HSET', KEYS[1], 'expires_at', secs(exp))
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'state', ARGV[4]) end
redis.call('PEXPIRE', KEYS[1], ttl)
local inst = redis.call('HGET', KEYS[1], 'prefill_instance')
if inst then redis.call('ZADD', ARGV[2] .. inst, 'XX', exp, ARGV[3]) end
return 1
"""

# KEYS: index. ARGV: hash prefix, ttl_ms, reason. -> number invalidated
_INVALIDATE = """
local ttl = tonumber(ARGV[2])
local exp = now_ms() + ttl
local n = 0
for _, hid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[1] .. hid
  local state = redis.call('HGET', key, 'state')
  if not state then
    redis.call('ZREM', KEYS[1], hid)
  elseif state == 'READY' or state == 'CLAIMED' then
    redis.call('HSET', key, 'state', 'EXPIRED', 'reason', ARGV[3], 'expires_at', secs(exp))
    redis.call('PEXPIRE', key, ttl)
    redis.call('ZADD', KEYS[1], 'XX', exp, hid)
    n = n + 1
  end
end
return n
"""

# KEYS: hash. ARGV: index prefix, handle_id. -> 1 | 0
_FORGET = """
local inst = redis.call('HGET', KEYS[1], 'prefill_instance')
local n = redis.call('DEL', KEYS[1])
if inst then redis.call('ZREM', ARGV[1] .. inst, ARGV[2]) end
return n
"""

# KEYS: index. -> live handle ids (entries past their expiry are pruned first)
_LIST = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms())
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


def _ms(ttl_s: float) -> int:
    return max(1, int(ttl_s * 1000))


def encode_handle(handle: KVHandle) -> dict[str, str]:
    """The hash fields of a handle (state and expiry are set by the scripts)."""
    return {
        "v": str(HANDLE_SCHEMA_VERSION),
        "handle_id": handle.handle_id,
        "request_id": handle.request_id,
        "prefill_instance": handle.prefill_instance,
        "transfer_endpoint": handle.transfer_endpoint,
        "block_ids": json.dumps(list(handle.block_ids)),
        "num_tokens": str(handle.num_tokens),
        "layout": json.dumps(handle.layout.to_dict()),
        "prefill_address": handle.prefill_address,
        "extra": json.dumps(handle.extra),
        "parts": json.dumps([p.to_dict() for p in handle.parts]),
        "secret": handle.secret,
    }


def decode_handle(fields: dict[str, str]) -> KVHandle:
    """A handle from its hash fields; refuses schema versions newer than this code knows."""
    version = int(fields.get("v", "1"))
    if version > HANDLE_SCHEMA_VERSION:
        raise KVError(f"KV handle schema v{version} is newer than this worker's v{HANDLE_SCHEMA_VERSION}")
    return KVHandle(
        handle_id=fields["handle_id"],
        request_id=fields["request_id"],
        prefill_instance=fields["prefill_instance"],
        transfer_endpoint=fields["transfer_endpoint"],
        block_ids=[int(b) for b in json.loads(fields["block_ids"])],
        num_tokens=int(fields["num_tokens"]),
        layout=KVLayout.from_dict(json.loads(fields["layout"])),
        expires_at=float(fields["expires_at"]),
        state=HandleState(fields["state"]),
        version=version,
        prefill_address=fields.get("prefill_address", ""),
        extra=json.loads(fields.get("extra") or "{}"),
        parts=[KVPart.from_dict(p) for p in json.loads(fields.get("parts") or "[]")],
        secret=fields.get("secret", ""),
    )


class RedisKVRegistry:
    """``KVRegistry`` on Redis (``redis.asyncio``); create and use it within one event loop."""

    def __init__(
        self,
        url: str,
        prefix: str = "pdmesh:",
        *,
        socket_timeout_s: float = 2.0,
        retries: int = 3,
        released_ttl_s: float = RELEASED_TTL_S,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.released_ttl_s = released_ttl_s
        self._redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=min(1.0, socket_timeout_s),
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=30,
        )
        scripts = {"register": _REGISTER, "claim": _CLAIM, "extend": _EXTEND}
        scripts |= {"invalidate": _INVALIDATE, "forget": _FORGET, "list": _LIST}
        self._scripts = {name: self._redis.register_script(_PRELUDE + body) for name, body in scripts.items()}

    def _key(self, handle_id: str) -> str:
        return f"{self.prefix}kv:{handle_id}"

    def _index(self, instance_id: str) -> str:
        return f"{self.prefix}kvidx:{instance_id}"

    @property
    def _index_prefix(self) -> str:
        return f"{self.prefix}kvidx:"

    async def _call(self, what: str, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except _UNAVAILABLE as exc:
            raise RegistryUnavailable(
                f"KV registry at {mask_url(self.url)} unreachable during {what}: {exc}"
            ) from exc
        except RedisError as exc:
            raise KVError(f"KV registry error during {what}: {exc}") from exc

    async def register(self, handle: KVHandle, ttl_s: float) -> None:
        """Publishes a READY handle for ``ttl_s`` and adds it to its prefill instance's index."""
        fields = [item for pair in encode_handle(handle).items() for item in pair]
        keys = [self._key(handle.handle_id), self._index(handle.prefill_instance)]
        expires_ms = await self._call(
            "register", self._scripts["register"](keys=keys, args=[_ms(ttl_s), handle.handle_id, *fields])
        )
        handle.state, handle.expires_at = HandleState.READY, int(expires_ms) / 1000
        log.debug("registered KV handle %s (%d blocks)", handle.handle_id, len(handle.block_ids))

    async def claim(self, handle_id: str, claimer: str, ttl_s: float) -> KVHandle:
        """READY -> CLAIMED atomically, renewing the TTL for the pull; else ``HandleUnavailable``."""
        args = [claimer, _ms(ttl_s), self._index_prefix, handle_id]
        ok, payload = await self._call(
            "claim", self._scripts["claim"](keys=[self._key(handle_id)], args=args)
        )
        if not int(ok):
            raise HandleUnavailable(handle_id, payload)
        return decode_handle(dict(zip(payload[::2], payload[1::2], strict=True)))

    async def renew(self, handle_id: str, ttl_s: float) -> bool:
        """Extends a READY or CLAIMED handle's lease; False when it is gone or past that."""
        args = [_ms(ttl_s), self._index_prefix, handle_id, ""]
        return bool(
            await self._call("renew", self._scripts["extend"](keys=[self._key(handle_id)], args=args))
        )

    async def release(self, handle_id: str) -> bool:
        """CLAIMED|READY -> RELEASED, kept a short while so that the prefill reaper sees it."""
        args = [_ms(self.released_ttl_s), self._index_prefix, handle_id, HandleState.RELEASED.value]
        return bool(
            await self._call("release", self._scripts["extend"](keys=[self._key(handle_id)], args=args))
        )

    async def get(self, handle_id: str) -> KVHandle | None:
        fields = await self._call("get", self._redis.hgetall(self._key(handle_id)))
        if not fields or "state" not in fields:
            return None
        return decode_handle(fields)

    async def instance_handles(self, instance_id: str) -> list[str]:
        """Ids of the handles of a prefill instance that have not expired yet (any state)."""
        return list(
            await self._call("instance_handles", self._scripts["list"](keys=[self._index(instance_id)]))
        )

    async def invalidate_instance(self, instance_id: str) -> int:
        """Marks every live handle of a (dead) instance EXPIRED so that claims fail fast."""
        args = [
            f"{self.prefix}kv:",
            _ms(self.released_ttl_s),
            f"invalidated: prefill instance {instance_id} is gone",
        ]
        count = int(
            await self._call(
                "invalidate", self._scripts["invalidate"](keys=[self._index(instance_id)], args=args)
            )
        )
        if count:
            log.info("invalidated %d KV handles of instance %s", count, instance_id)
        return count

    async def forget(self, handle_id: str) -> None:
        """Deletes the handle and its index entry; forgetting twice is harmless."""
        await self._call(
            "forget",
            self._scripts["forget"](keys=[self._key(handle_id)], args=[self._index_prefix, handle_id]),
        )

    async def ping(self) -> bool:
        """True when Redis answers."""
        try:
            return bool(await self._call("ping", self._redis.ping()))
        except KVError:
            return False

    async def close(self) -> None:
        await self._redis.aclose()
