"""Role flips and the P:D ratio loop.

A flip goes as MindIE's does: mark the instance DRAINING (coordinators stop routing to it), wait until
its heartbeats report no running or waiting request and no pinned KV handle, have the ``RoleActuator``
switch it, record the new role and put it back online (HEALTHY). Only one flip runs at a time; a flip
never leaves the cluster without a prefill or without a decode instance. The flip's target role is
stored with the draining mark, so a controller that becomes active after the previous one died
mid-flip finishes it (``resume_interrupted``).

The thing that acts is a ``RoleActuator``. ``LocalGrpcActuator`` calls the worker's ``SetRole`` so that
the running process switches in place; a Kubernetes actuator (relabel or replace the pod) would
implement the same protocol.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc

from pdmesh.membership import InstanceInfoData, InstanceState, Role
from pdmesh.rpc.client import open_channel
from pdmesh.rpc.convert_cluster import role_to_proto
from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from services.controller.membership import Membership
from services.controller.ratio import DemandMeter, RatioPolicy, RatioTarget, auto_prefill, fixed_prefill

log = logging.getLogger(__name__)

Persist = Callable[[], Awaitable[None]]


class FlipRefused(RuntimeError):
    """The flip would break the floor (one prefill, one decode) or another flip is running."""


class FlipFailed(RuntimeError):
    """The instance left, or the actuator could not switch it; the instance is back online."""


class RoleActuator(Protocol):
    """Switches one drained instance to a new role; returns when it serves in that role."""

    async def flip(self, instance: InstanceInfoData, new_role: Role) -> None: ...


class LocalGrpcActuator:
    """Calls ``Worker.SetRole`` on the instance itself (the process switches in place).

    The worker refuses with FAILED_PRECONDITION while it still has work; that is retried until
    ``timeout_s``. Any other error raises ``FlipFailed``.
    """

    def __init__(self, timeout_s: float = 30.0, retry_s: float = 0.2) -> None:
        self.timeout_s = timeout_s
        self.retry_s = retry_s

    async def flip(self, instance: InstanceInfoData, new_role: Role) -> None:
        deadline = time.monotonic() + self.timeout_s
        request = worker_pb2.SetRoleRequest(role=role_to_proto(new_role))
        async with open_channel(instance.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            while True:
                try:
                    await stub.SetRole(request, timeout=max(1.0, min(10.0, deadline - time.monotonic())))
                    return
                except grpc.aio.AioRpcError as exc:
                    busy = exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                    if not busy or time.monotonic() + self.retry_s > deadline:
                        raise FlipFailed(
                            f"SetRole on {instance.instance_id}: {exc.code().name} {exc.details()}"
                        ) from None
                await asyncio.sleep(self.retry_s)


def _count(instances: list[InstanceInfoData], role: Role) -> int:
    return sum(1 for i in instances if i.role == role)


class RoleManager:
    """Runs flips (asked for, or from the ratio target) one at a time."""

    def __init__(
        self,
        membership: Membership,
        actuator: RoleActuator,
        policy: RatioPolicy,
        target: RatioTarget,
        persist: Persist,
        *,
        drain_timeout_s: float = 60.0,
        settle_s: float = 0.5,
        demand_window_s: float = 10.0,
        is_active: Callable[[], bool] = lambda: True,
    ) -> None:
        self.membership = membership
        self.actuator = actuator
        self.policy = policy
        self.target = target
        self.persist = persist
        self.drain_timeout_s = drain_timeout_s
        self.settle_s = settle_s  # the draining mark reaches coordinators and a fresh load arrives
        self.meter = DemandMeter(demand_window_s)
        self.is_active = is_active  # a controller that lost its lease mid-flip must not switch the worker
        self.flips = 0
        # (from role, to role, outcome) -> flips, for the metrics
        self.flip_counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._lock = asyncio.Lock()

    def check_floor(self, info: InstanceInfoData, new_role: Role) -> None:
        """FlipRefused when moving ``info`` away from its role leaves none of that role."""
        members = self.membership.instances()
        if (
            info.role in (Role.PREFILL, Role.DECODE)
            and info.role != new_role
            and _count(members, info.role) <= 1
        ):
            raise FlipRefused(f"{info.instance_id} is the last {info.role.value} instance")

    async def flip(self, instance_id: str, new_role: Role) -> InstanceInfoData:
        """Drain, switch, back online; KeyError for an unknown id, FlipRefused, FlipFailed, TimeoutError."""
        info = self.membership.get(instance_id)
        if info is None:
            raise KeyError(instance_id)
        if info.role == new_role:
            return info
        try:
            self.check_floor(info, new_role)
            if self._lock.locked():
                raise FlipRefused("another role flip is running")
        except FlipRefused:
            self.flip_counts[(info.role.value, new_role.value, "refused")] += 1
            raise
        async with self._lock:
            self.check_floor(info, new_role)
            return await self._flip_locked(info, new_role)

    async def _flip_locked(
        self, info: InstanceInfoData, new_role: Role, resuming: bool = False
    ) -> InstanceInfoData:
        instance_id = info.instance_id
        log.info("flipping %s: %s -> %s (draining)", instance_id, info.role.value, new_role.value)
        # a resumed flip found the draining mark its first controller set: it ends back online
        was_draining = False if resuming else self.membership.is_draining(instance_id)
        self.membership.set_draining(instance_id, True)
        self.membership.set_flip_target(instance_id, new_role)
        outcome = "failed"
        await self.persist()
        try:
            drained = await self.wait_drained(instance_id)
            if not self.is_active():
                raise FlipFailed(f"this controller is no longer active; {instance_id} keeps its role")
            await self.actuator.flip(drained, new_role)  # idempotent: a worker already switched stays
            self.membership.set_role(instance_id, new_role)
            outcome = "ok"
        finally:
            self.flip_counts[(info.role.value, new_role.value, outcome)] += 1
            self.membership.set_flip_target(instance_id, None)
            self.membership.set_draining(instance_id, was_draining)
            await self.persist()
        self.flips += 1
        self.policy.record_flip(time.time())
        log.info("flipped %s to %s; back online", instance_id, new_role.value)
        return self.membership.get(instance_id)

    async def resume_interrupted(self) -> list[str]:
        """Finishes the flips a previous active controller started but did not end (it died while
        one was draining or switching); returns the ids flipped. A flip that fails ends the instance
        back online in its old role, as any failed flip does."""
        done = []
        for instance_id, new_role in sorted(self.membership.flip_targets().items()):
            info = self.membership.get(instance_id)
            if info is None:
                continue
            log.warning("resuming the interrupted flip of %s to %s", instance_id, new_role.value)
            try:
                async with self._lock:
                    await self._flip_locked(info, new_role, resuming=True)
            except (FlipFailed, TimeoutError) as exc:
                log.warning("resumed flip of %s failed: %s", instance_id, exc)
                continue
            done.append(instance_id)
        return done

    async def wait_drained(self, instance_id: str) -> InstanceInfoData:
        """Waits (after ``settle_s``) until the instance reports no work; TimeoutError after the limit."""
        await asyncio.sleep(self.settle_s)
        deadline = time.monotonic() + self.drain_timeout_s
        while True:
            info = self.membership.get(instance_id)
            if info is None:
                raise FlipFailed(f"{instance_id} left the cluster while draining")
            if info.load.idle():  # an unknown load is never idle
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{instance_id} did not drain within {self.drain_timeout_s:.0f}s ({info.load})"
                )
            await asyncio.sleep(0.1)

    def pick(self, donor: Role) -> InstanceInfoData | None:
        """The healthy instance of ``donor`` role with the least work, or None."""
        candidates = [
            i for i in self.membership.instances() if i.role == donor and i.state == InstanceState.HEALTHY
        ]
        return min(candidates, key=lambda i: (i.load.running + i.load.waiting, i.instance_id), default=None)

    async def tick(self, now: float | None = None) -> str | None:
        """One ratio check; flips at most one instance; returns its id (or None)."""
        now = time.time() if now is None else now
        members = [i for i in self.membership.instances() if i.role in (Role.PREFILL, Role.DECODE)]
        demand = self.meter.measure(members, now)
        if self._lock.locked():
            return None
        prefill, decode = _count(members, Role.PREFILL), _count(members, Role.DECODE)
        wanted = self.policy.decide(self.target, prefill, decode, demand, now)
        if wanted == prefill:
            return None
        donor, new_role = (Role.DECODE, Role.PREFILL) if wanted > prefill else (Role.PREFILL, Role.DECODE)
        chosen = self.pick(donor)
        if chosen is None:
            return None
        log.info(
            "ratio %s: %dP:%dD -> %dP (%s)",
            self.target,
            prefill,
            decode,
            wanted,
            demand.describe(self.policy.capacity, prefill, decode),
        )
        try:
            await self.flip(chosen.instance_id, new_role)
        except (FlipRefused, FlipFailed, TimeoutError, KeyError) as exc:
            log.warning("automatic flip of %s failed: %s", chosen.instance_id, exc)
            self.policy.record_flip(now)  # back off as after a flip
            return None
        return chosen.instance_id

    def role_targets(self) -> dict[Role, int] | None:
        """How many prefill and decode instances the ratio asks for now (None when it is off, or
        auto before its first demand measurement)."""
        members = self.membership.instances()
        prefill, decode = _count(members, Role.PREFILL), _count(members, Role.DECODE)
        total = prefill + decode
        if self.target.mode == "fixed":
            wanted = fixed_prefill(self.target, total)
        elif self.target.mode == "auto" and self.meter.measured:
            wanted = auto_prefill(self.meter.last, prefill, decode, self.policy.capacity)
        else:
            return None
        return {Role.PREFILL: wanted, Role.DECODE: total - wanted}

    def describe_demand(self) -> str:
        """The last measured demand in words (empty before the first ratio check)."""
        if not self.meter.measured:
            return ""
        members = self.membership.instances()
        prefill, decode = _count(members, Role.PREFILL), _count(members, Role.DECODE)
        return self.meter.last.describe(self.policy.capacity, prefill, decode)

    async def run_forever(self, interval_s: float, is_active: Callable[[], bool]) -> None:
        """The ratio loop; does nothing while this controller is a standby."""
        while True:
            await asyncio.sleep(interval_s)
            if not is_active():
                continue
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad tick
                log.exception("ratio check failed")
