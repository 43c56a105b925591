"""The Controller gRPC servicer: membership calls and the cluster-view stream.

Protobuf stops here: requests turn into ``pdmesh.membership`` dataclasses before they reach the
membership, and views turn back into messages on the way out. A standby controller refuses every
call with FAILED_PRECONDITION and the active controller's address in the trailing metadata
(``pdmesh-active-controller``), so that clients follow it. A controller that holds the lease but is
still settling (Redis lost its state) takes membership calls, holds view streams open without a view,
and refuses the rest naming itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from pdmesh.rpc.controller_endpoints import ACTIVE_METADATA_KEY
from pdmesh.rpc.convert_cluster import (
    instance_from_proto,
    instance_to_proto,
    load_from_proto,
    role_from_proto,
    view_to_proto,
)
from pdmesh.v1 import controller_pb2, controller_pb2_grpc
from services.controller.ha import Leadership
from services.controller.membership import Membership
from services.controller.ratio import parse_ratio
from services.controller.roles import FlipFailed, FlipRefused, RoleManager
from services.controller.state import FencedOut

log = logging.getLogger(__name__)


class ControllerServicer(controller_pb2_grpc.ControllerServicer):
    """Membership calls, the view stream and administration over one Membership."""

    def __init__(
        self,
        membership: Membership,
        heartbeat_interval_s: float,
        leadership: Leadership | None = None,
        roles: RoleManager | None = None,
    ) -> None:
        self._membership = membership
        self._heartbeat_interval_ms = max(1, round(heartbeat_interval_s * 1000))
        self._closing = asyncio.Event()
        self.leadership = leadership
        self.roles = roles
        self.watchers = 0
        self.metrics_address = ""  # this controller's /metrics server (ListInstances tells it)

    def is_active(self) -> bool:
        return self.leadership is None or self.leadership.active

    def is_holder(self) -> bool:
        """Holds the lease: active, or settling before it acts (it takes registrations already)."""
        return self.leadership is None or self.leadership.holding

    async def _require_active(self, context) -> None:
        """FAILED_PRECONDITION naming the active controller when this one is a standby (or settling)."""
        if not self.is_active():
            await self._refuse(context)

    async def _require_holder(self, context) -> None:
        """Membership calls: refused only by a standby."""
        if not self.is_holder():
            await self._refuse(context)

    async def _refuse(self, context) -> None:
        leadership = self.leadership
        if leadership.settling:  # clients stay here: this controller acts soon
            why = (
                f"controller taking over after Redis lost its state: acting in {leadership.acts_in_s():.1f}s"
            )
            active = leadership.address
        else:
            active = leadership.active_address
            where = f"the active controller is {active}" if active else "no controller is active yet"
            why = f"standby controller: {where}"
        metadata = ((ACTIVE_METADATA_KEY, active),) if active else ()
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, why, trailing_metadata=metadata)

    def close(self) -> None:
        """Ends every open WatchCluster stream (before a graceful stop, so that it does not wait on them)."""
        self._closing.set()

    async def Register(self, request, context) -> controller_pb2.RegisterResponse:
        await self._require_holder(context)
        if not request.HasField("instance"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "instance is missing")
        try:
            info = instance_from_proto(request.instance)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad Register: {exc}")
        self._membership.register(info)
        return controller_pb2.RegisterResponse(heartbeat_interval_ms=self._heartbeat_interval_ms)

    async def Heartbeat(self, request, context) -> controller_pb2.HeartbeatResponse:
        await self._require_holder(context)
        await _require_instance_id(request.instance_id, "Heartbeat", context)
        load = load_from_proto(request.load) if request.HasField("load") else None
        known = self._membership.heartbeat(request.instance_id, load)
        if not known:
            log.info("heartbeat from unknown instance %s: asking it to register", request.instance_id)
        return controller_pb2.HeartbeatResponse(known=known)

    async def Deregister(self, request, context) -> controller_pb2.DeregisterResponse:
        await self._require_holder(context)
        await _require_instance_id(request.instance_id, "Deregister", context)
        self._membership.deregister(request.instance_id)
        return controller_pb2.DeregisterResponse()

    async def ListInstances(self, request, context) -> controller_pb2.ListInstancesResponse:
        await self._require_active(context)
        return controller_pb2.ListInstancesResponse(
            instances=[instance_to_proto(i) for i in self._membership.instances()],
            ratio=str(self.roles.target) if self.roles else "off",
            active=self.leadership.address if self.leadership else "",
            fencing_token=self.leadership.token if self.leadership else 0,
            demand=self.roles.describe_demand() if self.roles else "",
            metrics_address=self.metrics_address,
        )

    async def SetRatio(self, request, context) -> controller_pb2.SetRatioResponse:
        await self._require_active(context)
        try:
            target = parse_ratio(request.ratio)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.leadership is not None:
            await self._fenced(context, self.leadership.set_ratio(str(target)))
        if self.roles is not None:
            self.roles.target = target
        log.info("ratio target set to %s", target)
        return controller_pb2.SetRatioResponse(ratio=str(target))

    async def Drain(self, request, context) -> controller_pb2.DrainResponse:
        return await self._set_draining(request, context, True)

    async def Undrain(self, request, context) -> controller_pb2.DrainResponse:
        return await self._set_draining(request, context, False)

    async def _set_draining(self, request, context, draining: bool) -> controller_pb2.DrainResponse:
        await self._require_active(context)
        await _require_instance_id(request.instance_id, "Drain" if draining else "Undrain", context)
        if not self._membership.set_draining(request.instance_id, draining):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no instance {request.instance_id!r}")
        if self.leadership is not None:
            await self._fenced(context, self.leadership.flush())
        info = self._membership.get(request.instance_id)
        return controller_pb2.DrainResponse(instance=instance_to_proto(info))

    async def FlipRole(self, request, context) -> controller_pb2.FlipRoleResponse:
        await self._require_active(context)
        await _require_instance_id(request.instance_id, "FlipRole", context)
        try:
            role = role_from_proto(request.role)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad FlipRole: {exc}")
        if self.roles is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this controller does not manage roles")
        try:
            info = await self.roles.flip(request.instance_id, role)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no instance {request.instance_id!r}")
        except FlipRefused as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except TimeoutError as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except FlipFailed as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        return controller_pb2.FlipRoleResponse(instance=instance_to_proto(info))

    async def _fenced(self, context, write) -> None:
        """Runs a state write; a fenced-out controller answers as the standby it now is."""
        try:
            await write
        except FencedOut:
            await self._require_active(context)

    async def WatchCluster(self, request, context) -> AsyncIterator[controller_pb2.ClusterView]:
        """The current view at once, then the latest view after each change (changes may coalesce).

        A controller settling after Redis lost its state holds the stream open and sends the first
        view when it starts acting: until then the watcher routes on the view it had."""
        watcher = request.watcher_id or context.peer()
        log.info("watcher %s connected", watcher)
        await self._require_holder(context)
        self.watchers += 1
        try:
            while not self._closing.is_set():
                await self._require_holder(context)
                view = self._membership.view()
                if self.is_active():  # a settling controller's view may lack instances: not sent yet
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
