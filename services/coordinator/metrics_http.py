"""The coordinator's metrics port: ``/metrics`` (its own series) and ``/metrics/mesh`` (its own, every
worker's and the active controller's, merged: pdmesh.observability.mesh_scrape).

A small Starlette app apart from the API (the port may stay open to the scraper while the API is
not); server.py serves it with uvicorn in the coordinator's event loop.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pdmesh.observability.coordinator_metrics import SCRAPE_FAILURES
from pdmesh.observability.mesh_scrape import scrape_mesh
from pdmesh.rpc.controller_client import ClusterWatcher
from services.coordinator.cluster_info import list_instances

CONTROLLER_TARGET = "controller"


async def mesh_targets(watcher: ClusterWatcher) -> dict[str, str]:
    """``{name: host:port}``: every worker in the view that advertises a metrics address, and the
    active controller when it answers with one."""
    targets = {i.instance_id: i.metrics_address for i in watcher.view.instances if i.metrics_address}
    reply = await list_instances(watcher)
    if reply is None:
        SCRAPE_FAILURES.labels(CONTROLLER_TARGET).inc()  # it did not even say where its metrics are
    elif reply.metrics_address:
        targets[CONTROLLER_TARGET] = reply.metrics_address
    return targets


def create_metrics_app(watcher: ClusterWatcher) -> Starlette:
    """The metrics port's routes."""

    async def own(request: Request) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def mesh(request: Request) -> Response:
        text = await scrape_mesh(await mesh_targets(watcher))
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", own), Route("/metrics/mesh", mesh)])
