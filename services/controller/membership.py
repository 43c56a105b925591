"""Cluster membership: who is registered, who is late with heartbeats or failing probes, who is dead.

Pure logic over ``pdmesh.membership`` dataclasses (no protobuf, no I/O), with an injectable clock so
that tests drive time. Health: an instance turns suspect when its heartbeats are late or its health
probe fails, dead (and leaves at once) when either has lasted ``dead_after_s``, and healthy again when
both are fine. A draining mark (role flip, administration) shows as DRAINING while it is healthy.
Changes that a standby must know about (joins, leaves, roles, draining marks) land in ``dirty`` for
the controller to write to Redis.

The view version grows by one whenever the membership changes (an instance joins, leaves, turns
suspect, recovers, or dies). Load reports alone do not change the version: they would wake every
watcher on every heartbeat. The latest loads are in every view that is sent and in ``instances()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from pdmesh.membership import ClusterViewData, InstanceInfoData, InstanceState, LoadData, Role

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
        self._draining: set[str] = set()
        self._flip_targets: dict[str, Role] = {}  # instance id -> the role a flip in progress moves it to
        # loads not current: restored records no heartbeat reported on yet, instances that sent none
        self._load_unknown: set[str] = set()
        self._probe_failing: dict[str, float] = {}  # instance id -> when its probes started failing
        self.dirty: set[str] = set()  # ids whose stored record is out of date
        self._version = 0
        self._changed = asyncio.Event()

    @property
    def version(self) -> int:
        return self._version

    def get(self, instance_id: str) -> InstanceInfoData | None:
        """A copy of one instance's record, or None when it is not a member."""
        info = self._instances.get(instance_id)
        return self._public(info) if info is not None else None

    def instances(self) -> list[InstanceInfoData]:
        """Copies of every member, sorted by id (a draining healthy member shows as DRAINING)."""
        return [self._public(self._instances[k]) for k in sorted(self._instances)]

    def is_draining(self, instance_id: str) -> bool:
        return instance_id in self._draining

    def _public(self, record: InstanceInfoData) -> InstanceInfoData:
        info = record.copy()
        if info.instance_id in self._draining and info.state == InstanceState.HEALTHY:
            info.state = InstanceState.DRAINING
        info.load.unknown = info.instance_id in self._load_unknown
        return info

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
        self._probe_failing.pop(record.instance_id, None)
        self._set_load_known(record.instance_id, not record.load.unknown)
        self.dirty.add(record.instance_id)
        if previous is None:
            log.info("instance %s (%s) joined at %s", record.instance_id, record.role.value, record.address)
        else:
            log.info("instance %s registered again (was %s)", record.instance_id, previous.state.value)
        self._bump()
        return self._public(record)

    def heartbeat(self, instance_id: str, load: LoadData | None = None) -> bool:
        """Records a heartbeat; False when the instance is unknown (it must register again).

        A heartbeat without a load (the instance could not measure it) keeps the last figures but
        marks them unknown, so that no drain or ratio decision rests on them.
        """
        record = self._instances.get(instance_id)
        if record is None:
            return False
        record.last_heartbeat = self._clock()
        if load is not None:
            record.load = load
        self._set_load_known(instance_id, load is not None and not load.unknown)
        if record.state == InstanceState.SUSPECT and instance_id not in self._probe_failing:
            self._recover(record)
        return True

    def probe_result(self, instance_id: str, ok: bool, now: float | None = None) -> None:
        """Records one health probe: a failure starts (or continues) the probe-failure clock."""
        record = self._instances.get(instance_id)
        if record is None:
            return
        now = self._clock() if now is None else now
        if not ok:
            self._probe_failing.setdefault(instance_id, now)
            return
        self._probe_failing.pop(instance_id, None)
        heartbeat_fresh = now - record.last_heartbeat < self.suspect_after_s
        if record.state == InstanceState.SUSPECT and heartbeat_fresh:
            self._recover(record)

    def _recover(self, record: InstanceInfoData) -> None:
        record.state = InstanceState.HEALTHY
        log.info("instance %s is healthy again", record.instance_id)
        self._bump()

    def set_draining(self, instance_id: str, draining: bool) -> bool:
        """Marks (or unmarks) an instance as draining; False when it is not a member."""
        if instance_id not in self._instances:
            return False
        if draining != (instance_id in self._draining):
            (self._draining.add if draining else self._draining.discard)(instance_id)
            log.info("instance %s %s", instance_id, "is draining" if draining else "is back online")
            self.dirty.add(instance_id)
            self._bump()
        return True

    def set_flip_target(self, instance_id: str, role: Role | None) -> None:
        """Records (or clears) the role a flip in progress is moving an instance to, so that a
        controller taking over can finish the flip."""
        if instance_id in self._instances and self._flip_targets.get(instance_id) != role:
            if role is None:
                self._flip_targets.pop(instance_id, None)
            else:
                self._flip_targets[instance_id] = role
            self.dirty.add(instance_id)
            self._bump()

    def _set_load_known(self, instance_id: str, known: bool) -> None:
        (self._load_unknown.discard if known else self._load_unknown.add)(instance_id)

    def load_known(self, instance_id: str) -> bool:
        """False between taking over a stored state (loads are not stored) and the first heartbeat with
        a load, and after a heartbeat that came without one."""
        return instance_id not in self._load_unknown

    def flip_target(self, instance_id: str) -> Role | None:
        return self._flip_targets.get(instance_id)

    def flip_targets(self) -> dict[str, Role]:
        """Every unfinished flip: instance id -> target role."""
        return dict(self._flip_targets)

    def set_role(self, instance_id: str, role: Role) -> bool:
        """Records an instance's new role (after a flip); False when it is not a member."""
        record = self._instances.get(instance_id)
        if record is None:
            return False
        if record.role != role:
            record.role = role
            self.dirty.add(instance_id)
            self._bump()
        return True

    def restore(
        self,
        instances: list[InstanceInfoData],
        draining: set[str],
        version: int,
        flips: dict[str, Role] | None = None,
    ) -> None:
        """Takes over a stored state: every instance healthy with a fresh grace period."""
        now = self._clock()
        self._instances = {}
        for info in instances:
            record = info.copy()
            record.state, record.last_heartbeat = InstanceState.HEALTHY, now
            self._instances[record.instance_id] = record
        self._draining = draining & set(self._instances)
        self._flip_targets = {k: v for k, v in (flips or {}).items() if k in self._instances}
        self._load_unknown = set(self._instances)
        self._probe_failing.clear()
        self.dirty.clear()
        self._version = max(self._version, version)
        self._bump()

    def deregister(self, instance_id: str) -> bool:
        """Removes an instance at once; False when it was not a member."""
        if not self._remove(instance_id):
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
            failing_s = now - self._probe_failing.get(instance_id, now)
            why = (
                f"no heartbeat for {silent_s:.1f}s"
                if silent_s >= failing_s
                else f"probe failing for {failing_s:.1f}s"
            )
            if max(silent_s, failing_s) >= self.dead_after_s:
                self._remove(instance_id)
                dead.append(instance_id)
                log.warning("instance %s is dead: %s", instance_id, why)
            elif max(silent_s, failing_s) >= self.suspect_after_s:
                if record.state == InstanceState.HEALTHY:
                    record.state = InstanceState.SUSPECT
                    changed = True
                    log.warning("instance %s is suspect: %s", instance_id, why)
        if dead or changed:
            self._bump()
        return dead

    async def wait_for_change(self, after_version: int, timeout_s: float | None = None) -> int:
        """Waits until the version exceeds ``after_version``; returns it (TimeoutError after timeout_s)."""
        async with asyncio.timeout(timeout_s):
            while self._version <= after_version:
                await self._changed.wait()
        return self._version

    def _remove(self, instance_id: str) -> bool:
        if self._instances.pop(instance_id, None) is None:
            return False
        self._draining.discard(instance_id)
        self._flip_targets.pop(instance_id, None)
        self._probe_failing.pop(instance_id, None)
        self._load_unknown.discard(instance_id)
        self.dirty.add(instance_id)
        return True

    def touch(self) -> None:
        """Wakes every view stream (say, on stepping down) by moving the version on."""
        self._bump()

    def _bump(self) -> None:
        self._version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()
