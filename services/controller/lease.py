"""The active controller's Redis lease with a fencing token.

* ``acquire``: ``SET lease <addr> NX PX ttl`` and, in the same Lua script, ``INCR`` of the fencing
  counter; the lease's value becomes ``<token>|<addr>``. Tokens only grow, so a newer holder always
  has a larger one.
* ``renew``: a Lua compare-and-``PEXPIRE`` on the exact value this holder wrote.
* ``release``: a Lua compare-and-``DEL``.
* Every state write elsewhere (``services.controller.state``) runs in Lua that compares its token with
  the fencing counter first, so an old active that wakes up after a standby took over cannot write.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local token = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], token .. '|' .. ARGV[1], 'PX', ARGV[2])
  return token
end
return 0
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
    """A Redis client with short timeouts: the lease must not hang on a slow server."""
    return aioredis.Redis.from_url(
        url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )


class LeaseLock:
    """One controller's handle on the shared lease (keys ``<prefix>ctl:lease`` and ``ctl:fence``)."""

    def __init__(self, redis: aioredis.Redis, address: str, ttl_s: float, prefix: str = "pdmesh:") -> None:
        self.redis = redis
        self.address = address
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.lease_key = f"{prefix}ctl:lease"
        self.fence_key = f"{prefix}ctl:fence"
        self.token = 0
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    @property
    def value(self) -> str:
        return f"{self.token}|{self.address}"

    async def acquire(self) -> int:
        """The new fencing token when the lease was free, else 0."""
        token = int(
            await self._acquire(keys=[self.lease_key, self.fence_key], args=[self.address, self.ttl_ms])
        )
        if token:
            self.token = token
        return token

    async def renew(self) -> bool:
        """Extends the lease; False when it is no longer ours (expired, or taken over)."""
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
        """The current holder, or None while nobody is active."""
        return parse_holder(await self.redis.get(self.lease_key))
