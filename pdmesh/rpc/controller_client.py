"""Clients of the controller: ``InstanceAgent`` (a worker's membership) and ``ClusterWatcher`` (the view).

Both outlive the controller: when it is away they log a warning, back off and try again, and the
watcher keeps serving its last view meanwhile. Both take one address or several (comma-separated, for
active/standby controllers) and follow the active one (``pdmesh.rpc.controller_endpoints``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable

import grpc

from pdmesh.membership import ClusterViewData, InstanceInfoData, LoadData
from pdmesh.rpc.client import DEFAULT_DEADLINE_S, open_channel
from pdmesh.rpc.controller_endpoints import ControllerEndpoints
from pdmesh.rpc.convert_cluster import instance_to_proto, load_to_proto, view_from_proto
from pdmesh.v1 import controller_pb2, controller_pb2_grpc

log = logging.getLogger(__name__)

ViewListener = Callable[[ClusterViewData], Awaitable[None] | None]


class Backoff:
    """Exponential backoff with jitter: ``next()`` gives the next delay, ``reset()`` starts over."""

    def __init__(self, initial_s: float = 0.1, max_s: float = 2.0, factor: float = 2.0) -> None:
        self.initial_s, self.max_s, self.factor = initial_s, max_s, factor
        self._next = initial_s

    def reset(self) -> None:
        self._next = self.initial_s

    def next(self) -> float:
        delay = self._next
        self._next = min(self.max_s, self._next * self.factor)
        return delay * random.uniform(0.8, 1.2)


def _failure_level(failures: int) -> int:
    """WARNING for the first failure in a row and every tenth after it, DEBUG in between."""
    return logging.WARNING if failures == 1 or failures % 10 == 0 else logging.DEBUG


class InstanceAgent:
    """Keeps one instance registered at the controller and sends its heartbeats with its load.

    ``start()`` returns once registered (retrying with backoff; ``register_timeout_s`` bounds the
    wait, after which it keeps trying in the background). A heartbeat answered ``known=false`` or a
    controller that stopped answering leads to a new Register. Nothing here raises at the worker.
    """

    def __init__(
        self,
        controller_address: str,
        info: InstanceInfoData,
        load_fn: Callable[[], LoadData],
        *,
        call_timeout_s: float = 2.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.endpoints = ControllerEndpoints(controller_address)
        self.info = info
        self._load_fn = load_fn
        self._call_timeout_s = min(call_timeout_s, DEFAULT_DEADLINE_S)
        self._backoff = backoff or Backoff()
        self._backoff_cap_s = self._backoff.max_s
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task | None = None
        self._registered = asyncio.Event()
        self.heartbeat_interval_s = 1.0
        self.registrations = 0
        self._failures = 0

    @property
    def controller_address(self) -> str:
        """The controller this agent talks to now (the active one, as far as it knows)."""
        return self.endpoints.current

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    @property
    def failures(self) -> int:
        """Calls to the controller that failed in a row (0 after a success)."""
        return self._failures

    async def update_info(self, info: InstanceInfoData) -> bool:
        """Replaces this instance's record (a role flip) and registers it again at once; True when
        the controller took it (otherwise the loop keeps trying)."""
        self.info = info
        return await self._register()

    async def start(self, register_timeout_s: float | None = None) -> None:
        """Starts the loop and waits until the first Register succeeded (or the timeout passed)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        try:
            await asyncio.wait_for(self._registered.wait(), register_timeout_s)
        except TimeoutError:
            log.warning(
                "%s: controller %s not reached within %.1fs; still trying in the background",
                self.info.instance_id,
                self.controller_address,
                register_timeout_s,
            )

    async def stop(self, deregister: bool = True) -> None:
        """Stops the heartbeats; then deregisters (best effort, short deadline) unless told not to."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if deregister and self.registrations > 0:
            await self._deregister()
        self._registered.clear()
        await self._close_channel()

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except Exception:  # noqa: BLE001 - the loop outlives any one bad step, never the worker
                log.exception("%s: membership loop step failed; retrying", self.info.instance_id)
                await asyncio.sleep(self._backoff.next())

    async def _step(self) -> None:
        """Registers when not registered (backing off on failure), else sends one heartbeat."""
        if not self._registered.is_set():
            if not await self._register():
                await asyncio.sleep(self._backoff.next())
                return
            self._backoff.reset()
        await asyncio.sleep(self.heartbeat_interval_s)
        if not await self._heartbeat():
            self._registered.clear()

    def _stub(self) -> controller_pb2_grpc.ControllerStub:
        if self._channel is None:
            self._channel = open_channel(self.controller_address)
        return controller_pb2_grpc.ControllerStub(self._channel)

    async def _close_channel(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def _register(self) -> bool:
        request = controller_pb2.RegisterRequest(instance=instance_to_proto(self._with_load()))
        try:
            reply = await self._stub().Register(request, timeout=self._call_timeout_s)
        except grpc.aio.AioRpcError as exc:
            await self._on_rpc_error("Register", exc)
            return False
        self._failures = 0
        if reply.heartbeat_interval_ms > 0:
            self.heartbeat_interval_s = reply.heartbeat_interval_ms / 1000
            # a controller taking over an emptied Redis gathers registrations for three heartbeat
            # periods (at least): retries must come within that, however long the outage was
            self._backoff.max_s = min(self._backoff_cap_s, max(0.5, 2 * self.heartbeat_interval_s))
        self.registrations += 1
        self._registered.set()
        log.info(
            "%s registered at controller %s (heartbeat every %.2fs)",
            self.info.instance_id,
            self.controller_address,
            self.heartbeat_interval_s,
        )
        return True

    async def _heartbeat(self) -> bool:
        """True while the controller knows this instance; False: register again."""
        request = controller_pb2.HeartbeatRequest(instance_id=self.info.instance_id)
        load = self._load()
        if not load.unknown:  # no load at all tells the controller the figures are unknown
            request.load.CopyFrom(load_to_proto(load))
        timeout = min(self._call_timeout_s, max(0.5, 2 * self.heartbeat_interval_s))
        try:
            reply = await self._stub().Heartbeat(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            await self._on_rpc_error("Heartbeat", exc)
            return False
        self._failures = 0
        if not reply.known:
            log.warning("%s: controller forgot this instance; registering again", self.info.instance_id)
        return reply.known

    async def _deregister(self) -> None:
        request = controller_pb2.DeregisterRequest(instance_id=self.info.instance_id)
        try:
            await self._stub().Deregister(request, timeout=min(1.0, self._call_timeout_s))
            log.info("%s deregistered", self.info.instance_id)
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "%s: Deregister failed (%s); the controller will time it out",
                self.info.instance_id,
                exc.code().name,
            )

    async def _on_rpc_error(self, method: str, exc: grpc.aio.AioRpcError) -> None:
        self._failures += 1
        log.log(
            _failure_level(self._failures),
            "%s: %s at controller %s failed (%d in a row): %s %s",
            self.info.instance_id,
            method,
            self.controller_address,
            self._failures,
            exc.code().name,
            exc.details(),
        )
        moved = self.endpoints.follow(exc)
        if moved or exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            await self._close_channel()  # a fresh channel skips gRPC's own reconnect backoff
        # A redirect does not reset the backoff: during an outage standbys point at a stale active,
        # and resetting on every redirect made workers re-register ten times a second. The first
        # call that succeeds resets it.

    def _load(self) -> LoadData:
        try:
            return self._load_fn()
        except Exception:  # noqa: BLE001 - a broken load probe must not stop the heartbeats
            log.exception("%s: load_fn failed; reporting the load as unknown", self.info.instance_id)
            return LoadData(unknown=True)

    def _with_load(self) -> InstanceInfoData:
        info = self.info.copy()
        info.load = self._load()
        return info


class ClusterWatcher:
    """Follows the controller's WatchCluster stream and keeps the last view it got.

    When the stream breaks, ``view`` keeps the last view (so callers route on it) while the watcher
    reconnects with backoff. A new stream (say, after a controller restart) replaces the view whole.
    """

    def __init__(
        self, controller_address: str, watcher_id: str = "", *, backoff: Backoff | None = None
    ) -> None:
        self.endpoints = ControllerEndpoints(controller_address)
        self.watcher_id = watcher_id
        self._backoff = backoff or Backoff()
        self._view = ClusterViewData()
        self._listeners: list[ViewListener] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._listener_tasks: set[asyncio.Task] = set()  # referenced until done
        self.connected = False
        self.views_received = 0
        self._failures = 0

    @property
    def controller_address(self) -> str:
        """The controller followed now (the active one, as far as this watcher knows)."""
        return self.endpoints.current

    @property
    def view(self) -> ClusterViewData:
        return self._view

    def add_listener(self, callback: ViewListener) -> None:
        """Calls ``callback(view)`` on every new view (sync or async; errors are logged)."""
        self._listeners.append(callback)

    async def start(self, first_view_timeout_s: float = 2.0) -> None:
        """Starts following; waits up to ``first_view_timeout_s`` for the first view, never raises."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        with contextlib.suppress(TimeoutError):
            await self.wait_for(lambda view: self.views_received > 0, first_view_timeout_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.connected = False

    async def wait_for(
        self, predicate: Callable[[ClusterViewData], bool], timeout_s: float | None = None
    ) -> ClusterViewData:
        """Waits until ``predicate(view)`` holds and returns that view; TimeoutError names the last view.

        The predicate is checked again on every new view and whenever the stream connects or breaks.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not predicate(self._view):
            changed = self._changed
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(
                    f"cluster view did not reach the condition within {timeout_s}s; last {self._view.summary()}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return self._view

    async def _run(self) -> None:
        request = controller_pb2.WatchClusterRequest(watcher_id=self.watcher_id)
        while True:
            try:
                async with open_channel(self.controller_address) as channel:
                    stream = controller_pb2_grpc.ControllerStub(channel).WatchCluster(request)
                    async for message in stream:
                        self._on_view(view_from_proto(message))
                log.warning("cluster view stream from %s ended; reconnecting", self.controller_address)
            except grpc.aio.AioRpcError as exc:
                self._failures += 1
                log.log(
                    _failure_level(self._failures),
                    "cluster view stream from %s broke: %s %s; routing on the last view (%s)",
                    self.controller_address,
                    exc.code().name,
                    exc.details(),
                    self._view.summary(),
                )
                self.endpoints.follow(exc)  # the backoff carries on: a redirect is not a success
            except ValueError as exc:
                log.error("bad cluster view from %s: %s; reconnecting", self.controller_address, exc)
            self._set_connected(False)
            await asyncio.sleep(self._backoff.next())

    def _on_view(self, view: ClusterViewData) -> None:
        if not self.connected:
            log.info("following the cluster view at %s (%s)", self.controller_address, view.summary())
        self._backoff.reset()
        self._failures = 0
        self._view = view
        self.views_received += 1
        self._set_connected(True)
        for listener in list(self._listeners):
            self._notify(listener, view)

    def _set_connected(self, connected: bool) -> None:
        """Records the stream's state and wakes ``wait_for`` (it re-checks on views and on this)."""
        self.connected = connected
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _notify(self, listener: ViewListener, view: ClusterViewData) -> None:
        try:
            result = listener(view)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._listener_tasks.add(task)
                task.add_done_callback(self._listener_tasks.discard)
                task.add_done_callback(_log_listener_error)
        except Exception:  # noqa: BLE001 - one bad listener must not stop the stream
            log.exception("cluster view listener failed")


def _log_listener_error(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("cluster view listener failed: %r", task.exception())
