"""The Controller gRPC servicer: membership calls and the cluster-view stream.

Protobuf stops here: requests turn into ``pdmesh.cluster`` dataclasses before they reach the
membership, and views turn back into messages on the way out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from pdmesh.rpc.convert_cluster import instance_from_proto, instance_to_proto, load_from_proto, view_to_proto
from pdmesh.v1 import controller_pb2, controller_pb2_grpc
from services.controller.membership import Membership

log = logging.getLogger(__name__)


class ControllerServicer(controller_pb2_grpc.ControllerServicer):
    """Serves Register, Heartbeat, Deregister, WatchCluster and ListInstances over one Membership."""

    def __init__(self, membership: Membership, heartbeat_interval_s: float) -> None:
        self._membership = membership
        self._heartbeat_interval_ms = max(1, round(heartbeat_interval_s * 1000))
        self._closing = asyncio.Event()
        self.watchers = 0

    def close(self) -> None:
        """Ends every open WatchCluster stream (before a graceful stop, so that it does not wait on them)."""
        self._closing.set()

    async def Register(self, request, context) -> controller_pb2.RegisterResponse:
        if not request.HasField("instance"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "instance is missing")
        try:
            info = instance_from_proto(request.instance)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad Register: {exc}")
        self._membership.register(info)
        return controller_pb2.RegisterResponse(heartbeat_interval_ms=self._heartbeat_interval_ms)

    async def Heartbeat(self, request, context) -> controller_pb2.HeartbeatResponse:
        await _require_instance_id(request.instance_id, "Heartbeat", context)
        load = load_from_proto(request.load) if request.HasField("load") else None
        known = self._membership.heartbeat(request.instance_id, load)
        if not known:
            log.info("heartbeat from unknown instance %s: asking it to register", request.instance_id)
        return controller_pb2.HeartbeatResponse(known=known)

    async def Deregister(self, request, context) -> controller_pb2.DeregisterResponse:
        await _require_instance_id(request.instance_id, "Deregister", context)
        self._membership.deregister(request.instance_id)
        return controller_pb2.DeregisterResponse()

    async def ListInstances(self, request, context) -> controller_pb2.ListInstancesResponse:
        return controller_pb2.ListInstancesResponse(
            instances=[instance_to_proto(i) for i in self._membership.instances()]
        )

    async def WatchCluster(self, request, context) -> AsyncIterator[controller_pb2.ClusterView]:
        """The current view at once, then the latest view after each change (changes may coalesce)."""
        watcher = request.watcher_id or context.peer()
        log.info("watcher %s connected", watcher)
        self.watchers += 1
        try:
            while not self._closing.is_set():
                view = self._membership.view()
                yield view_to_proto(view)
                await self._wait_change_or_close(view.version)
        finally:
            self.watchers -= 1
            log.info("watcher %s left", watcher)

    async def _wait_change_or_close(self, version: int) -> None:
        change = asyncio.ensure_future(self._membership.wait_for_change(version))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({change, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            change.cancel()
            closing.cancel()


async def _require_instance_id(instance_id: str, method: str, context) -> None:
    if not instance_id.strip():
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad {method}: instance_id is empty")
