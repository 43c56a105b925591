"""The coordinator's live page: ``GET /dashboard`` (one self-contained HTML file, no external scripts)
refreshing every 2 s from ``GET /dashboard/data`` (JSON).

The data: the instances of the coordinator's cluster view (role, state, load from their heartbeats),
the controller's P:D ratio (ListInstances), latency percentiles over the last 60 s and finished
requests per second (pdmesh.observability.coordinator_metrics.RECENT). An instance that leaves the view
(dead, or stopped) stays listed as ``gone`` for ``GONE_KEEP_S``, so that a crash shows on the page.
"""

from __future__ import annotations

import time
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from pdmesh.membership import ClusterViewData, InstanceInfoData
from pdmesh.observability.coordinator_metrics import RECENT
from pdmesh.rpc.controller_client import ClusterWatcher
from services.coordinator.cluster_info import list_instances

GONE = "gone"
GONE_KEEP_S = 60.0


class DashboardInstance(BaseModel):
    id: str
    role: str
    state: str  # healthy | suspect | draining, or gone (left the view within the last minute)
    running: int
    waiting: int
    kv_free: int
    kv_total: int


class DashboardLatency(BaseModel):
    """Seconds, over the last 60 s; null without requests."""

    ttft_p50: float | None = None
    ttft_p90: float | None = None
    ttft_p99: float | None = None
    itl_p50: float | None = None
    itl_p99: float | None = None
    e2e_p50: float | None = None
    e2e_p99: float | None = None


class DashboardData(BaseModel):
    instances: list[DashboardInstance]
    ratio: str  # the controller's target: "P:D", "auto" or "off"; "" while it does not answer
    latency: DashboardLatency
    requests_per_s: float


def _row(info: InstanceInfoData, state: str | None = None) -> DashboardInstance:
    load = info.load
    return DashboardInstance(
        id=info.instance_id,
        role=info.role.value,
        state=state or info.state.value,
        running=load.running,
        waiting=load.waiting,
        kv_free=load.free_blocks,
        kv_total=load.total_blocks,
    )


class DepartureLog:
    """Remembers the instances that left the cluster view, for ``GONE_KEEP_S``."""

    def __init__(self) -> None:
        self._last: dict[str, InstanceInfoData] = {}
        self._gone: dict[str, tuple[float, InstanceInfoData]] = {}

    def on_view(self, view: ClusterViewData) -> None:
        now = time.monotonic()
        current = {i.instance_id: i for i in view.instances}
        for instance_id, info in self._last.items():
            if instance_id not in current:
                self._gone[instance_id] = (now, info)
        for instance_id in current:
            self._gone.pop(instance_id, None)
        self._last = current

    def gone(self) -> list[InstanceInfoData]:
        cutoff = time.monotonic() - GONE_KEEP_S
        self._gone = {k: v for k, v in self._gone.items() if v[0] >= cutoff}
        return [info for _, info in self._gone.values()]


def install_dashboard(app: FastAPI, watcher: ClusterWatcher) -> None:
    """Adds ``/dashboard`` and ``/dashboard/data`` to the coordinator's HTTP app."""
    departures = DepartureLog()
    watcher.add_listener(departures.on_view)
    page = resources.files("services.coordinator").joinpath("static/dashboard.html").read_text()

    @app.get("/dashboard", response_class=HTMLResponse, responses={200: {"description": "The live page"}})
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/dashboard/data", response_model=DashboardData)
    async def dashboard_data() -> DashboardData:
        rows = [_row(i) for i in sorted(watcher.view.instances, key=lambda i: i.instance_id)]
        rows += [_row(i, GONE) for i in sorted(departures.gone(), key=lambda i: i.instance_id)]
        reply = await list_instances(watcher)
        latency, rate = RECENT.summary()
        return DashboardData(
            instances=rows,
            ratio=reply.ratio if reply is not None else "",
            latency=DashboardLatency(**latency),
            requests_per_s=round(rate, 3),
        )
