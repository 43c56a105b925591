"""Instance selection for the coordinator: which prefill and which decode instance serves a request."""

from __future__ import annotations

import itertools
from collections.abc import Collection

from pdmesh.cluster import ClusterViewData, InstanceInfoData, Role


class RoundRobinPolicy:
    """Takes healthy instances of a role in turn, skipping those a request already tried."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(
        self, candidates: list[InstanceInfoData], exclude: Collection[str] = ()
    ) -> InstanceInfoData | None:
        usable = [c for c in candidates if c.instance_id not in exclude] or candidates
        if not usable:
            return None
        usable = sorted(usable, key=lambda c: c.instance_id)
        return usable[next(self._counter) % len(usable)]


class Router:
    """Chooses instances from the controller's latest cluster view."""

    def __init__(self, view_fn) -> None:
        self._view_fn = view_fn  # () -> ClusterViewData
        self.prefill_policy = RoundRobinPolicy()
        self.decode_policy = RoundRobinPolicy()
        self.mixed_policy = RoundRobinPolicy()

    @property
    def view(self) -> ClusterViewData:
        return self._view_fn()

    def _healthy(self, role: Role) -> list[InstanceInfoData]:
        return list(self.view.healthy(role))

    def can_disaggregate(self) -> bool:
        return bool(self._healthy(Role.PREFILL)) and bool(self._healthy(Role.DECODE))

    def ready(self) -> bool:
        """True while a request can be served: one prefill and one decode instance, or a mixed one."""
        return self.can_disaggregate() or bool(self._healthy(Role.MIXED))

    def pick_prefill(self, exclude: Collection[str] = ()) -> InstanceInfoData | None:
        return self.prefill_policy.pick(self._healthy(Role.PREFILL), exclude)

    def pick_decode(self, exclude: Collection[str] = ()) -> InstanceInfoData | None:
        return self.decode_policy.pick(self._healthy(Role.DECODE), exclude)

    def pick_mixed(self, exclude: Collection[str] = ()) -> InstanceInfoData | None:
        return self.mixed_policy.pick(self._healthy(Role.MIXED), exclude)
