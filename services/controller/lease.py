"""The active controller's Redis lease with a fencing token.

* ``acquire``: ``SET lease <addr> NX PX ttl`` and, in the same Lua script, a new fencing token
  ``max(counter, floor, now_ms) + 1`` stored in the fencing counter; the lease's value becomes
  ``<token>|<addr>``. ``floor`` is the highest token this controller has seen (its own, the holder's,
  the counter's), ``now_ms`` its wall clock in milliseconds. So tokens grow even when Redis loses the
  counter: a controller that saw a token claims above it, and a freshly started one claims above the
  time (a restarted Redis would otherwise count from 1 again and hand out a token that is in use).
* The script also says whether the counter was *lost*: missing, or below the floor. A lost counter
  means Redis lost data (or is new: the two look alike), and an active controller from before may
  still be acting: the caller waits one lease period before it acts (``services.controller.ha``).
  A controller process that starts while Redis is away cannot know better, so even a new deployment
  pays that one lease once.
* ``renew``: a Lua compare-and-``PEXPIRE`` on the exact value this holder wrote.
* ``release``: a Lua compare-and-``DEL``.
* Every state write elsewhere (``services.controller.state``) runs in Lua that compares its token with
  the fencing counter first, so an old active that wakes up after a standby took over cannot write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

_ACQUIRE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {0, 0}
end
local stored = redis.call('GET', KEYS[2])
local counter = tonumber(stored or '0') or 0
local floor = tonumber(ARGV[3])
local token = string.format('%.0f', math.max(counter, floor, tonumber(ARGV[4])) + 1)
redis.call('SET', KEYS[2], token)
redis.call('SET', KEYS[1], token .. '|' .. ARGV[1], 'PX', ARGV[2])
local lost = 0
if not stored or counter < floor then lost = 1 end
return {token, lost}
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds the lease and with which fencing token."""

    token: int
    address: str


def parse_holder(value: str | None) -> LeaseHolder | None:
    """The holder named by a lease value ``<token>|<addr>``, or None."""
    if not value or "|" not in value:
        return None
    token, _, address = value.partition("|")
    return LeaseHolder(int(token), address) if token.isdigit() else None


def connect(url: str, timeout_s: float = 1.0) -> aioredis.Redis:
    """A Redis client with short timeouts: the lease must not hang on a slow server. A connection
    found closed (Redis restarted since its last use) is retried once at once on a new one; a timeout
    is not retried (the command may have run)."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
    )


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


class LeaseLock:
    """One controller's handle on the shared lease (keys ``<prefix>ctl:lease`` and ``ctl:fence``)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        address: str,
        ttl_s: float,
        prefix: str = "pdmesh:",
        clock_ms=wall_clock_ms,
    ) -> None:
        self.redis = redis
        self.address = address
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.lease_key = f"{prefix}ctl:lease"
        self.fence_key = f"{prefix}ctl:fence"
        self.token = 0
        self.floor = 0  # the highest fencing token seen; the next one claimed is above it
        self.counter_lost = False  # the last acquire found the counter lost (see the module docstring)
        self._clock_ms = clock_ms
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    @property
    def value(self) -> str:
        return f"{self.token}|{self.address}"

    def saw(self, token: int) -> None:
        """Raises the floor to a token seen elsewhere (the holder's, the counter's)."""
        self.floor = max(self.floor, token)

    async def acquire(self) -> int:
        """The new fencing token when the lease was free, else 0 (``counter_lost`` tells how it went)."""
        token, lost = await self._acquire(
            keys=[self.lease_key, self.fence_key],
            args=[self.address, self.ttl_ms, self.floor, self._clock_ms()],
        )
        token = int(token)
        if token:
            self.token, self.counter_lost = token, bool(lost)
            self.saw(token)
        return token

    async def renew(self) -> bool:
        """Extends the lease; False when it is no longer ours (expired, taken over, or lost with Redis)."""
        if not self.token:
            return False
        return bool(await self._renew(keys=[self.lease_key], args=[self.value, self.ttl_ms]))

    async def release(self) -> bool:
        """Gives the lease up (graceful stop) so that a standby need not wait for it to expire."""
        if not self.token:
            return False
        released = bool(await self._release(keys=[self.lease_key], args=[self.value]))
        self.token = 0
        return released

    async def holder(self) -> LeaseHolder | None:
        """The current holder, or None while nobody is active; its token raises the floor."""
        holder = parse_holder(await self.redis.get(self.lease_key))
        if holder is not None:
            self.saw(holder.token)
        return holder
