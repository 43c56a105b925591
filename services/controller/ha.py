"""Active/standby: who holds the lease, taking over, stepping down, and writing the state (fenced).

Without Redis a controller is always active and keeps its state in memory only. With Redis every
controller runs ``run_forever``: the active one renews its lease every third of the lease time and
writes membership changes; a standby tries to take the lease at the same pace, and on success loads
the stored state, so it is active within two lease periods of the old one's last renewal. A write
refused by the fencing check, or a lease that could not be renewed in time, turns the controller
into a standby at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.controller.lease import LeaseLock, connect
from services.controller.membership import Membership
from services.controller.state import ClusterStore, FencedOut

log = logging.getLogger(__name__)

Transition = Callable[[bool], None]  # called with True on becoming active, False on stepping down


class Leadership:
    """This controller's place in the active/standby pair (or group)."""

    def __init__(
        self,
        membership: Membership,
        address: str,
        redis_url: str | None,
        lease_ttl_s: float,
        *,
        on_transition: Transition | None = None,
        prefix: str = "pdmesh:",
    ) -> None:
        self.membership = membership
        self.address = address
        self.lease_ttl_s = lease_ttl_s
        self.on_transition = on_transition or (lambda active: None)
        self.redis: aioredis.Redis | None = connect(redis_url) if redis_url else None
        self.lease = LeaseLock(self.redis, address, lease_ttl_s, prefix) if self.redis else None
        self.store = ClusterStore(self.redis, self.lease.fence_key, prefix) if self.redis else None
        self.active = self.redis is None
        self.active_address = address if self.active else ""
        self.stored_ratio: str | None = None
        self._last_renewal = 0.0
        self._flush_lock = asyncio.Lock()

    @property
    def token(self) -> int:
        return self.lease.token if self.lease else 0

    async def run_forever(self) -> None:
        """Renews or tries to take the lease every third of the lease time."""
        if self.lease is None:
            return
        while True:
            await asyncio.sleep(self.lease_ttl_s / 3)
            await self.try_once()

    async def try_once(self) -> None:
        """One renewal (active) or one attempt to take the lease (standby)."""
        if self.lease is None:
            return
        try:
            await (self._renew() if self.active else self._try_acquire())
        except RedisError as exc:
            log.warning("Redis unreachable for the lease: %s", exc)
        if self.active and time.monotonic() - self._last_renewal > self.lease_ttl_s:
            self.step_down("the lease could not be renewed in time")

    async def _try_acquire(self) -> None:
        token = await self.lease.acquire()
        if not token:
            holder = await self.lease.holder()
            self.active_address = holder.address if holder else ""
            return
        state = await self.store.load()
        self.membership.restore(state.instances, state.draining, state.version + 1, state.flips)
        self.stored_ratio = state.ratio
        self._last_renewal = time.monotonic()
        self.active, self.active_address = True, self.address
        log.warning("now the ACTIVE controller (fencing token %d, %d instances)", token, len(state.instances))
        self.on_transition(True)

    async def _renew(self) -> None:
        if await self.lease.renew():
            self._last_renewal = time.monotonic()
        else:
            self.step_down("the lease is no longer ours")

    def step_down(self, why: str) -> None:
        """Stops acting at once; the next loop turn tries for the lease again."""
        if not self.active or self.lease is None:
            return
        log.warning("stepping down to STANDBY: %s", why)
        self.active, self.active_address = False, ""
        self.lease.token = 0
        self.on_transition(False)

    async def flush(self) -> None:
        """Writes the membership's dirty records and the view version, fenced; steps down if refused."""
        if self.store is None or not self.active:
            self.membership.dirty.clear()
            return
        async with self._flush_lock:
            dirty, self.membership.dirty = self.membership.dirty, set()
            try:
                for instance_id in sorted(dirty):
                    await self._write(instance_id)
                await self.store.set_meta(self.token, "version", str(self.membership.version))
            except FencedOut as exc:
                self.step_down(str(exc))
            except RedisError as exc:
                self.membership.dirty |= dirty  # try again with the next change
                log.warning("could not store the cluster state: %s", exc)

    async def _write(self, instance_id: str) -> None:
        info = self.membership.get(instance_id)
        if info is None:
            await self.store.delete_instance(self.token, instance_id)
        else:
            draining = self.membership.is_draining(instance_id)
            await self.store.put_instance(
                self.token, info, draining, self.membership.flip_target(instance_id)
            )

    async def set_ratio(self, ratio: str) -> None:
        """Stores the ratio target (fenced); FencedOut when a newer controller is active."""
        if self.store is not None:
            try:
                await self.store.set_meta(self.token, "ratio", ratio)
            except FencedOut as exc:
                self.step_down(str(exc))
                raise

    async def close(self) -> None:
        """Gives the lease up (a standby takes over without waiting for it to expire)."""
        if self.lease is not None and self.active:
            try:
                await self.lease.release()
            except RedisError as exc:
                log.warning("could not release the lease: %s", exc)
        self.active = self.redis is None
        if self.redis is not None:
            await self.redis.aclose()
