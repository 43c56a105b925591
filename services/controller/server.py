"""Assembles the controller: membership, the gRPC servicer with the health service, leadership (HA),
health probes, the role manager, and the loops that drive them (sweep, probe, ratio, state flush).

``create_controller`` is apart from ``main`` so that tests bind port 0 and run it in-process.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

from pdmesh.aio import raise_lost_cancellation
from pdmesh.config import ControllerConfig
from pdmesh.observability.metrics_server import MetricsServer
from pdmesh.planner.capacity import capacity_from_profile
from pdmesh.rpc.server import RunningServer, start_server
from pdmesh.v1 import controller_pb2_grpc
from services.controller.ha import Leadership
from services.controller.membership import Membership
from services.controller.metrics import DeadInstances, controller_registry
from services.controller.probe import HealthProber
from services.controller.ratio import Capacity, RatioPolicy, parse_ratio
from services.controller.roles import LocalGrpcActuator, RoleActuator, RoleManager
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


def recovery_grace_s(config: ControllerConfig) -> float:
    """How long a controller taking over a lost Redis state takes registrations before it acts: as
    configured, else three heartbeat intervals (workers that were told to register again do so
    within one or two)."""
    if config.recovery_grace_s is not None:
        return config.recovery_grace_s
    return 3 * config.heartbeat_interval_s


def instance_capacity(config: ControllerConfig) -> Capacity:
    """From the planner's latency model when a profile is given, else from configuration."""
    if config.planner_profile is None:
        return Capacity(config.prefill_capacity_tokens_per_s, config.decode_batch_capacity)
    measured = capacity_from_profile(
        config.planner_profile, config.planner_tpot_ms, config.planner_context_len
    )
    log.info(
        "auto ratio capacities from %s: %.0f prompt tokens/s per prefill instance, decode batch %d",
        config.planner_profile,
        measured.prefill_tokens_per_s,
        measured.decode_batch,
    )
    return Capacity(measured.prefill_tokens_per_s, measured.decode_batch)


def default_actuator(config: ControllerConfig) -> RoleActuator:
    """The actuator ``config.actuator`` names (the Kubernetes one only imports its client when chosen)."""
    if config.actuator == "kubernetes":
        from services.controller.k8s_actuator import KubernetesActuator

        return KubernetesActuator.from_environment(timeout_s=config.drain_timeout_s)
    return LocalGrpcActuator(timeout_s=config.drain_timeout_s)


class ControllerService:
    """A running controller; ``stop()`` ends the watch streams, the sweep loop and the gRPC server."""

    def __init__(
        self,
        config: ControllerConfig,
        membership: Membership,
        servicer: ControllerServicer,
        on_instance_dead: DeadHook,
        actuator: RoleActuator | None = None,
    ) -> None:
        self.config = config
        self.membership = membership
        self.servicer = servicer
        self.on_instance_dead = on_instance_dead
        self.server: RunningServer | None = None
        self.leadership = Leadership(
            membership,
            "",
            config.redis_url,
            config.lease_ttl_s,
            on_transition=self._on_transition,
            recovery_grace_s=recovery_grace_s(config),
        )
        self.prober = HealthProber(membership, config.probe_interval_s)
        capacity = instance_capacity(config)
        self.roles = RoleManager(
            membership,
            actuator or default_actuator(config),
            RatioPolicy(capacity, config.flip_cooldown_s),
            parse_ratio(config.pd_ratio),
            self.leadership.flush,
            drain_timeout_s=config.drain_timeout_s,
            settle_s=min(1.0, config.heartbeat_interval_s * 1.5),
            demand_window_s=config.demand_window_s,
            is_active=lambda: self.leadership.active,
        )
        servicer.leadership, servicer.roles = self.leadership, self.roles
        self.dead = DeadInstances()  # counted as dead in the metrics a while after they left
        self.takeovers = 0
        self.metrics_server: MetricsServer | None = None
        self._sweep_task: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self._hook_tasks: set[asyncio.Task] = set()

    @property
    def active(self) -> bool:
        return self.leadership.active

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return self.config.advertise_address or f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Binds, tries for the lease once (so that the first controller up holds it at once; over a new
        Redis it acts after its settle period), then starts the loops."""
        register = lambda s: controller_pb2_grpc.add_ControllerServicer_to_server(self.servicer, s)  # noqa: E731
        self.server = await start_server(register, [SERVICE_NAME], self.config.host, self.config.port)
        self.leadership.address = self.address
        if self.leadership.lease is not None:
            self.leadership.lease.address = self.address
        else:
            self.leadership.active_address = self.address
        if self.config.metrics_port is not None:
            self.metrics_server = MetricsServer(
                self.config.host,
                self.config.metrics_port,
                controller_registry(self),
                public_host=self.address.rsplit(":", 1)[0],
            )
            self.servicer.metrics_address = self.metrics_server.address
        await self.leadership.try_once()
        self._sweep_task = asyncio.ensure_future(self._sweep_forever(sweep_interval_s(self.config)))
        is_active = lambda: self.leadership.active  # noqa: E731
        self._tasks = [
            asyncio.ensure_future(self.leadership.run_forever()),
            asyncio.ensure_future(self.prober.run_forever(is_active)),
            asyncio.ensure_future(self.roles.run_forever(self.config.ratio_interval_s, is_active)),
            asyncio.ensure_future(self._flush_forever()),
        ]
        log.info(
            "controller serving on %s (heartbeat %.2fs, suspect after %.2fs, dead after %.2fs, ratio %s)",
            self.address,
            self.config.heartbeat_interval_s,
            self.config.suspect_after_s,
            self.config.dead_after_s,
            self.roles.target,
        )

    def _on_transition(self, active: bool) -> None:
        """Becoming active: take the stored ratio (or store ours); either way wake the view streams."""
        if active:
            self.takeovers += 1
            stored = self.leadership.stored_ratio
            try:
                self.roles.target = parse_ratio(stored) if stored else self.roles.target
            except ValueError:
                log.warning("ignoring the stored ratio %r", stored)
            if not stored:
                self._spawn(self.leadership.set_ratio(str(self.roles.target)))
            if self.membership.flip_targets():
                self._spawn(self.roles.resume_interrupted())
        self.membership.touch()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._hook_tasks.add(task)
        task.add_done_callback(self._hook_tasks.discard)
        task.add_done_callback(_log_failure)

    async def _flush_forever(self) -> None:
        """Writes membership changes to Redis (fenced) as they happen."""
        version = self.membership.version
        while True:
            version = await self.membership.wait_for_change(version)
            try:
                await self.leadership.flush()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad write
                log.exception("storing the cluster state failed")
            raise_lost_cancellation()

    async def stop(self, grace_s: float = 2.0) -> None:
        """Graceful stop: NOT_SERVING, watch streams ended, then the server stops within ``grace_s``."""
        self.servicer.close()
        if self._sweep_task is not None:
            self._sweep_task.cancel()
        for task in [*self._tasks, *self._hook_tasks]:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=1.0)
        await self.leadership.close()
        if self.server is not None:
            await self.server.stop(grace_s)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log.info("controller stopped")

    async def abandon(self) -> None:
        """Stops every loop and the server without releasing the lease (a crash, for tests)."""
        self.servicer.close()
        for task in [self._sweep_task, *self._tasks, *self._hook_tasks]:
            if task is not None:
                task.cancel()
        if self.server is not None:
            await self.server.server.stop(0)
        if self.metrics_server is not None:
            self.metrics_server.stop()

    def sweep_once(self, now: float | None = None) -> list[str]:
        """One sweep; runs the dead-instance hook for each instance that died."""
        roles = {i.instance_id: i.role.value for i in self.membership.instances()}
        dead = self.membership.sweep(now)
        for instance_id in dead:
            self.dead.record(instance_id, roles.get(instance_id, "unknown"))
            task = asyncio.ensure_future(self._run_dead_hook(instance_id))
            self._hook_tasks.add(task)
            task.add_done_callback(self._hook_tasks.discard)
        return dead

    async def _sweep_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if not self.leadership.active:
                continue
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


def _log_failure(task: asyncio.Task) -> None:
    """A background step failed (say, Redis went away meanwhile): say so in the log."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("background controller step failed: %r", task.exception())


async def create_controller(
    config: ControllerConfig,
    on_instance_dead: DeadHook | None = None,
    clock: Callable[[], float] = time.time,
    actuator: RoleActuator | None = None,
) -> ControllerService:
    """Starts a controller on ``config.host:config.port`` (port 0: a free one) with its sweep loop.

    ``on_instance_dead`` runs for every instance that dies (KV handle invalidation hooks in here);
    by default nothing runs. With ``config.redis_url`` it competes for the lease (active or standby);
    ``actuator`` switches roles (default: the worker's own SetRole over gRPC). Raises ValueError for inconsistent timings, OSError when the port is taken.
    """
    membership = Membership(config.suspect_after_s, config.dead_after_s, clock=clock)
    servicer = ControllerServicer(membership, config.heartbeat_interval_s)
    service = ControllerService(config, membership, servicer, on_instance_dead or _no_op, actuator)
    await service.start()
    return service
