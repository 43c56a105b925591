"""What the coordinator asks the active controller for besides the cluster view: the P:D ratio and
the controller's own metrics address (ListInstances), for the live page and ``/metrics/mesh``."""

from __future__ import annotations

import logging

import grpc

from pdmesh.rpc.client import open_channel
from pdmesh.rpc.controller_client import ClusterWatcher
from pdmesh.v1 import controller_pb2, controller_pb2_grpc

log = logging.getLogger(__name__)

LIST_TIMEOUT_S = 1.0  # the page refreshes every 2 s; a slow controller must not hold it up


async def list_instances(watcher: ClusterWatcher) -> controller_pb2.ListInstancesResponse | None:
    """ListInstances at the controller the watcher follows; None when it does not answer in time."""
    address = watcher.controller_address
    try:
        async with open_channel(address) as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            return await stub.ListInstances(controller_pb2.ListInstancesRequest(), timeout=LIST_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        log.info("ListInstances at %s failed: %s %s", address, exc.code().name, exc.details())
        return None
