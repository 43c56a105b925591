"""Cluster membership: who is registered, who is late with heartbeats, who is dead.

Pure logic over ``pdmesh.cluster`` dataclasses (no protobuf, no I/O), with an injectable clock so
that tests drive time. The state is one dict behind a handful of methods, so that a later version can
keep it in Redis (for a standby controller) without changing the callers.

The view version grows by one whenever the membership changes (an instance joins, leaves, turns
suspect, recovers, or dies). Load reports alone do not change the version: they would wake every
watcher on every heartbeat. The latest loads are in every view that is sent and in ``instances()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from pdmesh.cluster import ClusterViewData, InstanceInfoData, InstanceState, LoadData

log = logging.getLogger(__name__)


class Membership:
    """The controller's record of instances and the versioned view derived from it."""

    def __init__(
        self,
        suspect_after_s: float,
        dead_after_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < suspect_after_s < dead_after_s:
            raise ValueError(
                f"need 0 < suspect_after_s < dead_after_s, got suspect_after_s={suspect_after_s}, "
                f"dead_after_s={dead_after_s}"
            )
        self.suspect_after_s = suspect_after_s
        self.dead_after_s = dead_after_s
        self._clock = clock
        self._instances: dict[str, InstanceInfoData] = {}
        self._version = 0
        self._changed = asyncio.Event()

    @property
    def version(self) -> int:
        return self._version

    def get(self, instance_id: str) -> InstanceInfoData | None:
        """A copy of one instance's record, or None when it is not a member."""
        info = self._instances.get(instance_id)
        return info.copy() if info is not None else None

    def instances(self) -> list[InstanceInfoData]:
        """Copies of every member, sorted by id."""
        return [self._instances[k].copy() for k in sorted(self._instances)]

    def view(self) -> ClusterViewData:
        """The current versioned snapshot."""
        return ClusterViewData(version=self._version, instances=tuple(self.instances()))

    def register(self, info: InstanceInfoData) -> InstanceInfoData:
        """Adds (or replaces: a restarted worker registers again) an instance, healthy as of now."""
        info.validate()
        record = info.copy()
        record.state = InstanceState.HEALTHY
        record.last_heartbeat = self._clock()
        previous = self._instances.get(record.instance_id)
        self._instances[record.instance_id] = record
        if previous is None:
            log.info("instance %s (%s) joined at %s", record.instance_id, record.role.value, record.address)
        else:
            log.info("instance %s registered again (was %s)", record.instance_id, previous.state.value)
        self._bump()
        return record.copy()

    def heartbeat(self, instance_id: str, load: LoadData | None = None) -> bool:
        """Records a heartbeat; False when the instance is unknown (it must register again)."""
        record = self._instances.get(instance_id)
        if record is None:
            return False
        record.last_heartbeat = self._clock()
        if load is not None:
            record.load = load
        if record.state == InstanceState.SUSPECT:
            record.state = InstanceState.HEALTHY
            log.info("instance %s is healthy again", instance_id)
            self._bump()
        return True

    def deregister(self, instance_id: str) -> bool:
        """Removes an instance at once; False when it was not a member."""
        if self._instances.pop(instance_id, None) is None:
            return False
        log.info("instance %s deregistered", instance_id)
        self._bump()
        return True

    def sweep(self, now: float | None = None) -> list[str]:
        """Marks late instances suspect and removes dead ones; returns the ids that died."""
        now = self._clock() if now is None else now
        dead: list[str] = []
        changed = False
        for instance_id, record in list(self._instances.items()):
            silent_s = now - record.last_heartbeat
            if silent_s >= self.dead_after_s:
                del self._instances[instance_id]
                dead.append(instance_id)
                log.warning("instance %s is dead: no heartbeat for %.1fs", instance_id, silent_s)
            elif silent_s >= self.suspect_after_s and record.state == InstanceState.HEALTHY:
                record.state = InstanceState.SUSPECT
                changed = True
                log.warning("instance %s is suspect: no heartbeat for %.1fs", instance_id, silent_s)
        if dead or changed:
            self._bump()
        return dead

    async def wait_for_change(self, after_version: int, timeout_s: float | None = None) -> int:
        """Waits until the version exceeds ``after_version``; returns it (TimeoutError after timeout_s)."""
        async with asyncio.timeout(timeout_s):
            while self._version <= after_version:
                await self._changed.wait()
        return self._version

    def _bump(self) -> None:
        self._version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()
