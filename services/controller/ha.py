"""Active/standby: who holds the lease, taking over, stepping down, and writing the state (fenced).

Without Redis a controller is always active and keeps its state in memory only. With Redis every
controller runs ``run_forever``: the holder renews its lease every third of the lease time and writes
membership changes; a standby tries to take the lease at the same pace, reads the stored state and
the fencing counter (it carries both, in case Redis loses them), and on success loads the stored
state, so it is active within two lease periods of the old one's last renewal.

A stale active stops before a new one acts. The holder's lease is valid by its own clock only until
the last renewal it *sent* plus the lease time (Redis cannot expire it earlier), and ``active`` says
False from that moment on, whatever the renewal loop is doing; a write refused by the fencing check
or a refused renewal turns it into a standby at once. When Redis lost the lease with its data, the old
active may still act for up to one lease time, so a controller that takes the lease over a lost
fencing counter (missing, or below a token it has seen) first *settles*: it completes the state it
finds with the one it knew, accepts registrations and heartbeats, and acts (sweeps, flips roles,
publishes views) only after ``settle_s``, at least one lease time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pdmesh.aio import raise_lost_cancellation
from services.controller.lease import LeaseLock, connect
from services.controller.membership import Membership
from services.controller.state import ClusterStore, FencedOut, StoredState, merge_states

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
        recovery_grace_s: float = 0.0,
    ) -> None:
        self.membership = membership
        self.address = address
        self.lease_ttl_s = lease_ttl_s
        self.settle_s = max(lease_ttl_s, recovery_grace_s)
        self.on_transition = on_transition or (lambda active: None)
        self.redis: aioredis.Redis | None = connect(redis_url) if redis_url else None
        self.lease = LeaseLock(self.redis, address, lease_ttl_s, prefix) if self.redis else None
        self.store = ClusterStore(self.redis, self.lease.fence_key, prefix) if self.redis else None
        self.active_address = address if self.redis is None else ""
        self.stored_ratio: str | None = None  # the ratio target in Redis (as loaded or last written)
        self.known: StoredState | None = None  # the latest state this controller knew (Redis may lose it)
        self._holding = False  # holds the lease (settling or active)
        self._acting = False  # ... and acts
        self._valid_until = 0.0  # monotonic: the lease is surely ours until then
        self._act_at = 0.0  # monotonic: when a settling holder starts acting
        self._flush_lock = asyncio.Lock()
        self._turn_lock = asyncio.Lock()

    @property
    def token(self) -> int:
        return self.lease.token if self.lease else 0

    @property
    def holding(self) -> bool:
        """Holds a lease that is still valid by the local clock (acting, or settling before acting)."""
        return self.lease is None or (self._holding and time.monotonic() < self._valid_until)

    @property
    def active(self) -> bool:
        """Acts as the active controller now; checked before every action."""
        return self.lease is None or (self._acting and self.holding)

    @property
    def settling(self) -> bool:
        return self.holding and not self.active

    def acts_in_s(self) -> float:
        """Seconds until a settling holder acts (0 when active or standby)."""
        return max(0.0, self._act_at - time.monotonic()) if self.settling else 0.0

    async def run_forever(self) -> None:
        """Renews or tries to take the lease every third of the lease time; in between, steps down the
        moment the lease runs out and starts acting the moment the settle period ends."""
        if self.lease is None:
            return
        period = self.lease_ttl_s / 3
        next_turn = time.monotonic() + period
        while True:
            await asyncio.sleep(max(0.0, min(next_turn, self._next_deadline()) - time.monotonic()))
            if time.monotonic() >= next_turn:
                next_turn = time.monotonic() + period
                await self.try_once()
                raise_lost_cancellation()
            else:
                self._check_clock()

    def _next_deadline(self) -> float:
        if not self._holding:
            return math.inf
        return self._valid_until if self._acting else min(self._valid_until, self._act_at)

    async def try_once(self) -> None:
        """One renewal (holder) or one attempt to take the lease (standby)."""
        if self.lease is None:
            return
        async with self._turn_lock:
            self._check_clock()
            try:
                await (self._renew() if self._holding else self._try_acquire())
                if self.holding and self.membership.dirty:
                    await self.flush()  # records a write could not store (Redis was away) go now
            except RedisError as exc:
                log.warning("Redis unreachable for the lease: %s", exc)
            self._check_clock()

    def _check_clock(self) -> None:
        """Steps down when the lease ran out unrenewed; starts acting when the settle period is over."""
        if not self._holding:
            return
        now = time.monotonic()
        if now >= self._valid_until:
            self.step_down("the lease could not be renewed in time")
        elif not self._acting and now >= self._act_at:
            self._start_acting(settled=True)

    async def _try_acquire(self) -> None:
        sent = time.monotonic()
        token = await self.lease.acquire()
        if not token:
            await self._follow_holder()
            return
        try:
            state = await self.store.load()
        except RedisError:
            await self.lease.release()  # try again next turn rather than hold the lease without a state
            raise
        lost = self.lease.counter_lost
        if lost and self.known is not None:
            state = merge_states(state, self.known)
        self.membership.restore(state.instances, state.draining, state.version + 1, state.flips)
        self.stored_ratio = state.ratio
        self._holding, self._valid_until = True, sent + self.lease_ttl_s
        self.active_address = self.address
        if not lost:
            self._start_acting(settled=False)
            return
        self.membership.dirty |= {i.instance_id for i in state.instances}  # Redis lost them: write back
        self._act_at = time.monotonic() + self.settle_s
        log.warning(
            "took the lease over a lost fencing counter (Redis is new or lost its data): fencing token "
            "%d, %d instances known; taking registrations for %.1fs before acting",
            token,
            len(state.instances),
            self.settle_s,
        )

    async def _follow_holder(self) -> None:
        """As a standby: who is active, and the stored state and counter to carry (if Redis kept them)."""
        holder = await self.lease.holder()
        self.active_address = holder.address if holder else ""
        counter, state = await self.store.snapshot()
        if counter is not None and counter >= self.lease.floor:
            self.lease.saw(counter)
            self.known = state

    def _start_acting(self, settled: bool) -> None:
        if settled:  # the restored instances not heard from while settling: their grace starts now
            for info in self.membership.instances():
                if not self.membership.load_known(info.instance_id):
                    self.membership.heartbeat(info.instance_id)
        self._acting = True
        log.warning(
            "now the ACTIVE controller (fencing token %d, %d instances)",
            self.token,
            len(self.membership.instances()),
        )
        self.on_transition(True)

    async def _renew(self) -> None:
        sent = time.monotonic()
        if await self.lease.renew():
            self._valid_until = sent + self.lease_ttl_s
        else:
            self.step_down("the lease is no longer ours")

    def step_down(self, why: str) -> None:
        """Stops acting at once, remembering the state; the next loop turn tries for the lease again."""
        if self.lease is None or not self._holding:
            return
        log.warning("stepping down to STANDBY: %s", why)
        self.known = self._own_state()
        self._holding = self._acting = False
        self.active_address = ""
        self.lease.token = 0
        self.on_transition(False)

    def _own_state(self) -> StoredState:
        members = self.membership.instances()
        return StoredState(
            instances=members,
            draining={i.instance_id for i in members if self.membership.is_draining(i.instance_id)},
            ratio=self.stored_ratio,
            version=self.membership.version,
            flips=self.membership.flip_targets(),
        )

    async def flush(self) -> None:
        """Writes the membership's dirty records and the view version, fenced; steps down if refused."""
        if self.store is None or not self.holding:
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
        self.stored_ratio = ratio

    async def close(self) -> None:
        """Gives the lease up (a standby takes over without waiting for it to expire)."""
        if self.lease is not None and self._holding:
            try:
                await self.lease.release()
            except RedisError as exc:
                log.warning("could not release the lease: %s", exc)
        self._holding = self._acting = False
        if self.redis is not None:
            await self.redis.aclose()
