"""Readiness as MindIE reports it: the coordinator is ready once the configured numbers of prefill,
decode and mixed instances are healthy in the cluster view; it then logs one line,
``pdmesh coordinator is ready``, and ``GET /ready`` answers 200.

Readiness is reached once: an instance that fails later makes requests retry elsewhere or get 503s
(``/health``), it does not take the coordinator out of a load balancer that also fronts others.
With no numbers configured, ready means servable: one prefill and one decode instance, or one mixed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pdmesh.membership import ClusterViewData, Role

log = logging.getLogger(__name__)

READY_LINE = "pdmesh coordinator is ready"


class Readiness:
    """Watches cluster views until the wanted instances are healthy."""

    def __init__(
        self,
        view_fn: Callable[[], ClusterViewData],
        servable_fn: Callable[[], bool],
        wanted: dict[Role, int] | None = None,
    ) -> None:
        self._view_fn = view_fn
        self._servable_fn = servable_fn
        self.wanted = {role: n for role, n in (wanted or {}).items() if n > 0}
        self.reached = False

    def missing(self, view: ClusterViewData) -> str:
        """What is still missing, in words ("" when nothing is)."""
        short = [
            f"{len(view.healthy(role))}/{n} {role.value}"
            for role, n in self.wanted.items()
            if len(view.healthy(role)) < n
        ]
        if short:
            return "healthy instances: " + ", ".join(short)
        return "" if self._servable_fn() else "no healthy prefill and decode instances (nor a mixed one)"

    def check(self, view: ClusterViewData | None = None) -> tuple[bool, str]:
        """(ready, what is missing); logs the ready line the first time it holds."""
        if self.reached:
            return True, ""
        missing = self.missing(view if view is not None else self._view_fn())
        if not missing:
            self.reached = True
            counts = ", ".join(f"{n} {role.value}" for role, n in self.wanted.items()) or "servable"
            log.info("%s (%s)", READY_LINE, counts)
        return self.reached, missing
