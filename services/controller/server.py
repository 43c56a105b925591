"""Assembles the controller: membership, the gRPC servicer with the health service, and the sweep loop.

``create_controller`` is apart from ``main`` so that tests bind port 0 and run it in-process.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

from pdmesh.config import ControllerConfig
from pdmesh.rpc.server import RunningServer, start_server
from pdmesh.v1 import controller_pb2_grpc
from services.controller.membership import Membership
from services.controller.servicer import ControllerServicer

log = logging.getLogger(__name__)

SERVICE_NAME = "pdmesh.v1.Controller"

# Called with the id of each instance that died (missed heartbeats); sync or async; errors are logged.
DeadHook = Callable[[str], Awaitable[None] | None]


def _no_op(instance_id: str) -> None:
    return None


def sweep_interval_s(config: ControllerConfig) -> float:
    """How often the sweep runs: often enough that a state change shows up within a fraction of its delay."""
    return max(0.01, min(config.heartbeat_interval_s, config.suspect_after_s) / 2)


class ControllerService:
    """A running controller; ``stop()`` ends the watch streams, the sweep loop and the gRPC server."""

    def __init__(
        self,
        config: ControllerConfig,
        membership: Membership,
        servicer: ControllerServicer,
        on_instance_dead: DeadHook,
    ) -> None:
        self.config = config
        self.membership = membership
        self.servicer = servicer
        self.on_instance_dead = on_instance_dead
        self.server: RunningServer | None = None
        self._sweep_task: asyncio.Task | None = None
        self._hook_tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        register = lambda s: controller_pb2_grpc.add_ControllerServicer_to_server(self.servicer, s)  # noqa: E731
        self.server = await start_server(register, [SERVICE_NAME], self.config.host, self.config.port)
        self._sweep_task = asyncio.ensure_future(self._sweep_forever(sweep_interval_s(self.config)))
        log.info(
            "controller serving on %s (heartbeat %.2fs, suspect after %.2fs, dead after %.2fs)",
            self.address,
            self.config.heartbeat_interval_s,
            self.config.suspect_after_s,
            self.config.dead_after_s,
        )

    async def stop(self, grace_s: float = 2.0) -> None:
        """Graceful stop: NOT_SERVING, watch streams ended, then the server stops within ``grace_s``."""
        self.servicer.close()
        if self._sweep_task is not None:
            self._sweep_task.cancel()
        for task in list(self._hook_tasks):
            task.cancel()
        if self.server is not None:
            await self.server.stop(grace_s)
        log.info("controller stopped")

    def sweep_once(self, now: float | None = None) -> list[str]:
        """One sweep; runs the dead-instance hook for each instance that died."""
        dead = self.membership.sweep(now)
        for instance_id in dead:
            task = asyncio.ensure_future(self._run_dead_hook(instance_id))
            self._hook_tasks.add(task)
            task.add_done_callback(self._hook_tasks.discard)
        return dead

    async def _sweep_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.sweep_once()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad sweep
                log.exception("membership sweep failed")

    async def _run_dead_hook(self, instance_id: str) -> None:
        try:
            result = self.on_instance_dead(instance_id)
            if inspect.isawaitable(result):
                await result
        except Exception:  # noqa: BLE001 - a failing hook must not take the controller down
            log.exception("on_instance_dead(%s) failed", instance_id)


async def create_controller(
    config: ControllerConfig,
    on_instance_dead: DeadHook | None = None,
    clock: Callable[[], float] = time.time,
) -> ControllerService:
    """Starts a controller on ``config.host:config.port`` (port 0: a free one) with its sweep loop.

    ``on_instance_dead`` runs for every instance that dies (KV handle invalidation hooks in here);
    by default nothing runs. Raises ValueError for inconsistent timings, OSError when the port is taken.
    """
    membership = Membership(config.suspect_after_s, config.dead_after_s, clock=clock)
    servicer = ControllerServicer(membership, config.heartbeat_interval_s)
    service = ControllerService(config, membership, servicer, on_instance_dead or _no_op)
    await service.start()
    return service
