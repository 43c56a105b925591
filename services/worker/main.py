"""A worker process: engine, KV registry, transfer, gRPC servicer and controller membership.

``python -m services.worker --role R``, ``pdmesh worker --role R`` and the role-named entry points
(``python -m services.prefill_worker``, ``pdmesh decode-worker`` ...) all end up in ``run_worker``; ``create_worker`` is apart from it so that tests can bind port 0.

One process holds what every phase needs, so that the controller can flip its role in place
(``Worker.switch_role``, behind the ``SetRole`` RPC): the prefill handler, its reaper and the KV
transfer server exist while the role is prefill or mixed and are created or stopped on a flip.

An instance of several ranks (``tp x dp > 1``) runs this process as its leader (rank 0: gRPC,
registration, heartbeats, scheduling) and ``pdmesh.parallel.follower`` on every other rank. When a
rank fails or dies the instance is broken: the leader fails what it runs (the coordinator retries
elsewhere), leaves the cluster and exits with ``GROUP_BROKEN_EXIT``, ending its followers, so that
its supervisor (``pdmesh up``, Kubernetes) restarts the group whole.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys

import grpc

from pdmesh.config import WorkerConfig
from pdmesh.engine.engine_loop import EngineLoop
from pdmesh.kv.redis_client import check_redis
from pdmesh.kv.registry import KVError, RedisKVRegistry
from pdmesh.kv.transfer import secure
from pdmesh.kv.transfer.base import make_transfer_server
from pdmesh.kv.transfer.sharded import ShardedPuller
from pdmesh.logs import setup_logging
from pdmesh.membership import InstanceInfoData, LoadData, Role
from pdmesh.observability import tracing
from pdmesh.observability.metrics_server import MetricsServer, start_metrics_server
from pdmesh.parallel import eplb_runtime
from pdmesh.parallel.instance import InstancePlan, Leader, plan_instance
from pdmesh.parallel.rank_engine import open_engine, run_follower
from pdmesh.rpc.channels import ChannelCache
from pdmesh.rpc.client import DEFAULT_DEADLINE_S
from pdmesh.rpc.controller_client import InstanceAgent
from pdmesh.rpc.server import RunningServer, serve_until_signal, start_server
from pdmesh.security import tls
from pdmesh.settings_cli import add_config_flags, config_from_flags
from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from services.worker.bridge import EngineBridge
from services.worker.decode import DecodeHandler
from services.worker.expert_metrics import EXPERTS
from services.worker.kv_plane import KVPlane
from services.worker.metrics import LOAD, WorkerMetrics
from services.worker.prefill import PrefillHandler
from services.worker.servicer import WorkerBusy, WorkerServicer

log = logging.getLogger(__name__)

GROUP_BROKEN_EXIT = 3  # the exit status of a leader whose instance broke (a rank failed or died)


class Worker:
    """A running worker; ``stop()`` takes it out of the cluster and frees everything it holds."""

    def __init__(self, config: WorkerConfig, engine_loop: EngineLoop, leader: Leader | None = None) -> None:
        self.config = config
        self.leader = leader
        self.kv: KVPlane | None = None
        self.exit_code = 0
        self._stopping = False
        self.role = config.role
        self.instance_id = ""
        self.engine_loop = engine_loop
        self.bridge = EngineBridge(engine_loop)
        self.registry = RedisKVRegistry(config.redis_url)
        self.transfer_server = None
        # mutual TLS on the KV transfer when this worker's TLS is on (its own certificate)
        self._transfer_tls = secure.worker_contexts(config)
        self.prefill: PrefillHandler | None = None
        self.server: RunningServer | None = None
        self.agent: InstanceAgent | None = None
        self.peers = ChannelCache(max_size=64)  # prefill workers this one tells to release KV
        self.decode: DecodeHandler | None = None
        self._reaper: asyncio.Task | None = None
        self._switch_lock = asyncio.Lock()
        self.metrics: WorkerMetrics | None = None
        self.metrics_server: MetricsServer | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.server.port}"

    async def start(self) -> None:
        cfg = self.config
        pool, layout = self.engine_loop.kv_pool, self.engine_loop.kv_layout
        self.server = await start_server(self._register, ["pdmesh.v1.Worker"], cfg.host, cfg.port)
        instance_id = self.instance_id = cfg.instance_id or f"{cfg.role}-{cfg.host}-{self.server.port}"
        tracing.set_span_attributes({"pdmesh.instance_id": instance_id, "pdmesh.role": cfg.role})
        self._start_metrics()
        await self._expire_previous_handles()
        puller = ShardedPuller(cfg.transfer_backend, pool, layout, ssl_context=self._transfer_tls[1])
        self.kv = KVPlane(layout, puller, self.engine_loop.engine.replica_of, self.leader)
        self.kv.metrics = self.metrics
        if cfg.role in ("prefill", "mixed"):
            self._start_prefill()
        self.decode = DecodeHandler(
            self.bridge, self.registry, self.kv, instance_id, cfg.kv_lease_s, self.release_remote
        )
        self.decode.metrics = self.metrics
        self._servicer.decode_handler = self.decode
        info = InstanceInfoData(
            instance_id=instance_id,
            role=Role(cfg.role),
            address=self.address,
            transfer_endpoint=self.transfer_server.endpoint if self.transfer_server else "",
            model=layout.model,
            metrics_address=self.metrics_server.address if self.metrics_server else "",
        )
        self.agent = InstanceAgent(cfg.controller, info, self._load)
        if self.leader is not None:
            loop = asyncio.get_running_loop()
            self.leader.executor.on_broken = lambda why: loop.call_soon_threadsafe(self._leave, why)
            if self.leader.executor.broken:  # a rank died while this one was starting
                self._leave(self.leader.executor.broken)
        await self.agent.start()
        log.info("%s worker %s serving on %s", cfg.role, instance_id, self.address)

    def _start_metrics(self) -> None:
        """The series of this worker (recorded whether or not they are served) and, with
        ``--metrics-port``, the server that exposes them."""
        self.metrics = WorkerMetrics(self.instance_id, lambda: self.role, self.config.transfer_backend)
        self.engine_loop.on_step = self.metrics.engine_step
        LOAD.add(self.metrics, self.engine_loop.stats)
        if self.leader is not None:
            self.leader.executor.on_collectives = self.metrics.collective
            model = self.leader.executor.runner.model
            if eplb_runtime.moe_layers(model):
                EXPERTS.add(self.metrics, lambda: eplb_runtime.expert_stats(model))
        self.metrics_server = start_metrics_server(self.config.host, self.config.metrics_port)

    def _leave(self, why: str) -> None:
        """The instance broke: stop as on SIGTERM (deregister, fail what runs, end the followers)
        and exit with GROUP_BROKEN_EXIT so that the supervisor restarts the whole group."""
        if self.exit_code or self._stopping:
            log.info("%s: a rank ended while the instance stops (%s)", self.instance_id, why)
            return
        log.error("%s: the instance broke (%s); leaving the cluster to restart", self.instance_id, why)
        self.exit_code = GROUP_BROKEN_EXIT
        os.kill(os.getpid(), signal.SIGTERM)

    async def _expire_previous_handles(self) -> None:
        """Handles that a previous process with this instance id registered (it crashed and was
        restarted) can never be pulled: expire them now rather than when their leases run out."""
        try:
            count = await self.registry.invalidate_instance(self.instance_id)
        except KVError as exc:
            log.warning("%s: could not expire the handles of a previous process: %s", self.instance_id, exc)
            return
        if count:
            self.metrics.handle("expired", count)
            log.warning("%s: expired %d KV handles its previous process left", self.instance_id, count)

    def _register(self, server) -> None:
        self._servicer = WorkerServicer(self.config.role, None, None, self.bridge, self.switch_role)
        worker_pb2_grpc.add_WorkerServicer_to_server(self._servicer, server)

    def _start_prefill(self) -> None:
        """The transfer server, the prefill handler and its reaper (prefill and mixed roles)."""
        cfg = self.config
        pool, layout = self.engine_loop.kv_pool, self.engine_loop.kv_layout
        self.transfer_server = make_transfer_server(
            cfg.transfer_backend, pool, layout, cfg.host, cfg.transfer_port, self._transfer_tls[0]
        )
        self.transfer_server.on_served = self.metrics.kv_sent
        self.transfer_server.start()
        self.kv.server = self.transfer_server
        self.prefill = PrefillHandler(
            self.bridge, self.registry, self.kv, self.instance_id, self.address, cfg.kv_lease_s
        )
        self.prefill.metrics = self.metrics
        self._reaper = asyncio.ensure_future(self.prefill.reap_forever())
        self._servicer.prefill_handler = self.prefill

    def _stop_prefill(self) -> None:
        """Stops what only the prefill phase needs (its pinned handles are already gone)."""
        self._servicer.prefill_handler = None
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        if self.prefill is not None:
            self.prefill.free_all()
            self.prefill = None
        if self.transfer_server is not None:
            self.kv.server = None
            self.transfer_server.stop()
            self.transfer_server = None

    def _busy(self) -> str | None:
        s = self.engine_loop.stats()
        pinned = self.prefill.pinned_handles if self.prefill is not None else 0
        if s.running or s.waiting or pinned:
            return f"{s.running} running, {s.waiting} waiting, {pinned} pinned KV handles"
        return None

    async def switch_role(self, role: str) -> str:
        """Switches this worker's role in place and registers again; returns the transfer endpoint.

        Raises ``WorkerBusy`` while requests run or KV handles are pinned (the controller drains first).
        """
        async with self._switch_lock:
            if role != self.role:
                busy = self._busy()
                if busy:
                    raise WorkerBusy(f"{self.instance_id} is busy: {busy}")
                needs_prefill = role in ("prefill", "mixed")
                if needs_prefill and self.prefill is None:
                    self._start_prefill()
                elif not needs_prefill and self.prefill is not None:
                    self._stop_prefill()
                log.warning("%s switched role: %s -> %s", self.instance_id, self.role, role)
                self.role = self._servicer.role = role
                tracing.set_span_attributes({"pdmesh.role": role})
            endpoint = self.transfer_server.endpoint if self.transfer_server else ""
            if self.agent is not None:
                info = dataclasses.replace(self.agent.info, role=Role(role), transfer_endpoint=endpoint)
                await self.agent.update_info(info)
            return endpoint

    async def release_remote(self, address: str, handle_id: str) -> None:
        """Tells a prefill worker to free a handle's blocks now (best effort: its reaper is the fallback)."""
        stub = worker_pb2_grpc.WorkerStub(self.peers.get(address))
        try:
            await stub.Release(worker_pb2.ReleaseRequest(handle_id=handle_id), timeout=DEFAULT_DEADLINE_S)
        except grpc.aio.AioRpcError as exc:
            log.warning("[%s] Release at %s failed: %s", handle_id.split(":")[0], address, exc.code().name)
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.peers.discard(address)  # that worker is gone; a new one may take the address

    def _load(self) -> LoadData:
        s = self.engine_loop.stats()
        pinned = self.prefill.pinned_handles if self.prefill is not None else 0
        return LoadData(
            s.running,
            s.waiting,
            s.free_blocks,
            s.total_blocks,
            s.queued_prefill_tokens,
            pinned_handles=pinned,
            prompt_tokens_total=self._servicer.prompt_tokens_total,
            prefix_cache_hit_tokens=s.prefix_cache_hit_tokens,
            prefix_cache_query_tokens=s.prefix_cache_query_tokens,
        )

    async def stop(self) -> None:
        self._stopping = True
        if self.agent is not None:
            await self.agent.stop()
        if self._reaper is not None:
            self._reaper.cancel()
        if self.server is not None:
            await self.server.stop(grace_s=2.0)
        if self.decode is not None:
            await self.decode.close()
        await self.peers.close()
        if self.prefill is not None:
            self.prefill.free_all()
        if self.transfer_server is not None:
            self.transfer_server.stop()
        if self.kv is not None:
            self.kv.close()
        try:
            await self.registry.close()
        except Exception as exc:  # noqa: BLE001 - stopping: the engine must stop whatever Redis says
            log.warning("closing the KV registry client failed: %r", exc)
        self.engine_loop.stop()
        if self.leader is not None:
            await asyncio.to_thread(self.leader.stop)
        if self.metrics is not None:
            LOAD.remove(self.metrics)
            EXPERTS.remove(self.metrics)
        if self.metrics_server is not None:
            self.metrics_server.stop()


def build_engine_loop(
    config: WorkerConfig, plan: InstancePlan | None = None
) -> tuple[EngineLoop, Leader | None]:
    """The engine on its thread (and the instance's leader, when it has several ranks)."""
    engine, leader = open_engine(config, plan)
    engine_loop = EngineLoop(engine)
    engine_loop.start()
    return engine_loop, leader


async def create_worker(config: WorkerConfig, plan: InstancePlan | None = None) -> Worker:
    engine_loop, leader = await asyncio.to_thread(build_engine_loop, config, plan)
    worker = Worker(config, engine_loop, leader)
    await worker.start()
    return worker


async def _serve(config: WorkerConfig, plan: InstancePlan | None) -> int:
    tracing.configure(
        "pdmesh-worker",
        config.otlp_traces_endpoint,
        config.trace_sample_ratio,
        role=config.role,
        instance_id=config.instance_id,
    )
    try:
        await check_redis(config.redis_url)  # before the engine loads: a bad password fails fast
        worker = await create_worker(config, plan)
        await serve_until_signal(worker.server, on_stop=worker.stop)
    finally:
        await asyncio.to_thread(tracing.shutdown)
    return worker.exit_code


def parse_args(argv: list[str] | None, role: str | None) -> WorkerConfig:
    """Flags over the environment (PDMESH_WORKER_*); exits with a one-line error on bad values."""
    prog = f"pdmesh {role}-worker" if role else "pdmesh worker"
    parser = argparse.ArgumentParser(prog=prog, description="a pdmesh worker")
    add_config_flags(parser, WorkerConfig, skip=("role",) if role else ())
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    fixed = {"role": role} if role else {}
    return config_from_flags(parser, WorkerConfig, args, **fixed)


def run_worker(argv: list[str] | None = None, role: str | None = None) -> int:
    config = parse_args(argv, role)
    try:
        # Before the engine loads: a bad TLS file fails startup at once. Followers of a multi-rank
        # instance talk to their leader over the ranks' own control channel, not gRPC.
        tls.configure(tls.files_from(config))
        plan = plan_instance(config) if config.world_size > 1 else None
        if plan is not None and plan.spec.rank != 0:
            return run_follower(config, plan)
        return asyncio.run(_serve(config, plan))
    except (OSError, ValueError) as exc:
        print(f"pdmesh worker: {exc}", file=sys.stderr)
        return 1
