"""The controller's Prometheus series (``pdmesh_controller_*``), read from its state at scrape time.

Each controller serves its own registry (several controllers may share a test process): a collector
over the running ``ControllerService`` reports membership by role and state, the ratio target, role
flips, the lease and takeovers. An instance that died leaves the membership at once (routing must
forget it), so the controller keeps its id and role for ``DEAD_KEPT_S`` and counts it as ``dead``
until then, or until it registers again. Names and meanings: ``docs/observability.md``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdmesh.membership import InstanceInfoData, InstanceState, Role

if TYPE_CHECKING:
    from services.controller.server import ControllerService

DEAD_KEPT_S = 600.0  # how long a dead instance stays counted as dead after it left the view
ROLES = tuple(r.value for r in Role)
STATES = tuple(s.value for s in InstanceState)


class DeadInstances:
    """Instances that died recently: id -> (role, when)."""

    def __init__(self, kept_s: float = DEAD_KEPT_S) -> None:
        self.kept_s = kept_s
        self._dead: dict[str, tuple[str, float]] = {}

    def record(self, instance_id: str, role: str, now: float | None = None) -> None:
        self._dead[instance_id] = (role, time.monotonic() if now is None else now)

    def roles(self, members: set[str], now: float | None = None) -> list[str]:
        """The role of each instance still counted as dead (one back among ``members`` is not)."""
        now = time.monotonic() if now is None else now
        for instance_id, (_, at) in list(self._dead.items()):
            if instance_id in members or now - at > self.kept_s:
                del self._dead[instance_id]
        return [role for role, _ in self._dead.values()]


def instance_counts(members: list[InstanceInfoData], dead_roles: list[str]) -> Counter[tuple[str, str]]:
    """(role, state) -> instances, every combination present (zeros included)."""
    counts: Counter[tuple[str, str]] = Counter({(r, s): 0 for r in ROLES for s in STATES})
    for info in members:
        counts[(info.role.value, info.state.value)] += 1
    for role in dead_roles:
        counts[(role, InstanceState.DEAD.value)] += 1
    return counts


class ControllerCollector(Collector):
    """Reads one controller's membership, roles and leadership whenever it is scraped."""

    def __init__(self, service: ControllerService) -> None:
        self.service = service

    def collect(self) -> Iterator:
        service = self.service
        members = service.membership.instances()
        dead = service.dead.roles({i.instance_id for i in members})
        instances = GaugeMetricFamily(
            "pdmesh_controller_instances", "Instances by role and state", labels=("role", "state")
        )
        for (role, state), count in sorted(instance_counts(members, dead).items()):
            instances.add_metric([role, state], count)
        yield instances
        targets = service.roles.role_targets()
        if targets is not None:
            target = GaugeMetricFamily(
                "pdmesh_controller_role_instances_target",
                "Instances of each role the P:D ratio asks for (absent when the ratio is off)",
                labels=("role",),
            )
            for role, count in targets.items():
                target.add_metric([role.value], count)
            yield target
        flips = CounterMetricFamily(
            "pdmesh_controller_role_flips",
            "Role flips by outcome: ok, failed (back online in the old role) or refused",
            labels=("from_role", "to_role", "outcome"),
        )
        for labels, count in sorted(service.roles.flip_counts.items()):
            flips.add_metric(list(labels), count)
        yield flips
        leadership = service.leadership
        yield GaugeMetricFamily(
            "pdmesh_controller_lease_active",
            "1 while this controller holds the lease and acts, else 0 (standby)",
            value=1 if leadership.active else 0,
        )
        yield GaugeMetricFamily(
            "pdmesh_controller_fencing_token",
            "The fencing token of this controller's lease",
            value=leadership.token,
        )
        yield CounterMetricFamily(
            "pdmesh_controller_takeovers",
            "Times this controller became the active one (its first lease included)",
            value=service.takeovers,
        )

    def describe(self) -> list:
        return []


def controller_registry(service: ControllerService) -> CollectorRegistry:
    """A registry of its own for one controller (several may run in one test process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(service))
    return registry
