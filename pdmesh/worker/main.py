"""A worker process: engine, KV registry, transfer, gRPC servicer and controller membership.

``python -m services.prefill_worker`` / ``services.decode_worker`` and ``pdmesh mixed-worker`` all
end up in ``run_worker``; ``create_worker`` is apart from it so that tests can bind port 0.

One process holds what every phase needs, so that the controller can flip its role in place
(``Worker.switch_role``, behind the ``SetRole`` RPC): the prefill handler, its reaper and the KV
transfer server exist while the role is prefill or mixed and are created or stopped on a flip.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys

import grpc

from pdmesh.cluster import InstanceInfoData, LoadData, Role
from pdmesh.config import WorkerConfig
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.runner import EngineRunner
from pdmesh.kv.registry import KVError, RedisKVRegistry
from pdmesh.kv.transfer.base import allocate_pool, make_transfer_client, make_transfer_server
from pdmesh.kv.types import KVLayout
from pdmesh.logs import setup_logging
from pdmesh.rpc.channels import ChannelCache
from pdmesh.rpc.client import DEFAULT_DEADLINE_S
from pdmesh.rpc.controller_client import InstanceAgent
from pdmesh.rpc.server import RunningServer, serve_until_signal, start_server
from pdmesh.settings_cli import add_config_flags, config_from_flags
from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from pdmesh.worker.bridge import EngineBridge
from pdmesh.worker.decode import DecodeHandler
from pdmesh.worker.prefill import PrefillHandler
from pdmesh.worker.servicer import WorkerBusy, WorkerServicer

log = logging.getLogger(__name__)


class Worker:
    """A running worker; ``stop()`` takes it out of the cluster and frees everything it holds."""

    def __init__(self, config: WorkerConfig, runner: EngineRunner) -> None:
        self.config = config
        self.role = config.role
        self.instance_id = ""
        self.runner = runner
        self.bridge = EngineBridge(runner)
        self.registry = RedisKVRegistry(config.redis_url)
        self.transfer_server = None
        self.transfer_client = None
        self.prefill: PrefillHandler | None = None
        self.server: RunningServer | None = None
        self.agent: InstanceAgent | None = None
        self.peers = ChannelCache(max_size=64)  # prefill workers this one tells to release KV
        self.decode: DecodeHandler | None = None
        self._reaper: asyncio.Task | None = None
        self._switch_lock = asyncio.Lock()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.server.port}"

    async def start(self) -> None:
        cfg = self.config
        pool, layout = self.runner.kv_pool, self.runner.kv_layout
        self.server = await start_server(self._register, ["pdmesh.v1.Worker"], cfg.host, cfg.port)
        instance_id = self.instance_id = cfg.instance_id or f"{cfg.role}-{cfg.host}-{self.server.port}"
        await self._expire_previous_handles()
        if cfg.role in ("prefill", "mixed"):
            self._start_prefill()
        self.transfer_client = make_transfer_client(cfg.transfer_backend, pool, layout)
        self.decode = DecodeHandler(
            self.bridge, self.registry, self.transfer_client, instance_id, cfg.kv_lease_s, self.release_remote
        )
        self._servicer.decode_handler = self.decode
        info = InstanceInfoData(
            instance_id=instance_id,
            role=Role(cfg.role),
            address=self.address,
            transfer_endpoint=self.transfer_server.endpoint if self.transfer_server else "",
            model=layout.model,
        )
        self.agent = InstanceAgent(cfg.controller, info, self._load)
        await self.agent.start()
        log.info("%s worker %s serving on %s", cfg.role, instance_id, self.address)

    async def _expire_previous_handles(self) -> None:
        """Handles that a previous process with this instance id registered (it crashed and was
        restarted) can never be pulled: expire them now rather than when their leases run out."""
        try:
            count = await self.registry.invalidate_instance(self.instance_id)
        except KVError as exc:
            log.warning("%s: could not expire the handles of a previous process: %s", self.instance_id, exc)
            return
        if count:
            log.warning("%s: expired %d KV handles its previous process left", self.instance_id, count)

    def _register(self, server) -> None:
        self._servicer = WorkerServicer(self.config.role, None, None, self.bridge, self.switch_role)
        worker_pb2_grpc.add_WorkerServicer_to_server(self._servicer, server)

    def _start_prefill(self) -> None:
        """The transfer server, the prefill handler and its reaper (prefill and mixed roles)."""
        cfg = self.config
        pool, layout = self.runner.kv_pool, self.runner.kv_layout
        self.transfer_server = make_transfer_server(
            cfg.transfer_backend, pool, layout, cfg.host, cfg.transfer_port
        )
        self.transfer_server.start()
        self.prefill = PrefillHandler(
            self.bridge, self.registry, self.transfer_server, self.instance_id, self.address, cfg.kv_lease_s
        )
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
            self.transfer_server.stop()
            self.transfer_server = None

    def _busy(self) -> str | None:
        s = self.runner.stats()
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
        s = self.runner.stats()
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
        close_client = getattr(self.transfer_client, "close", None)
        if close_client is not None:
            close_client()
        try:
            await self.registry.close()
        except Exception as exc:  # noqa: BLE001 - stopping: the engine must stop whatever Redis says
            log.warning("closing the KV registry client failed: %r", exc)
        self.runner.stop()


def build_runner(config: WorkerConfig) -> EngineRunner:
    engine_config = EngineConfig(
        model_dir=config.model_dir,
        dtype=config.dtype,
        device=config.device,
        block_size=config.block_size,
        kv_cache_memory_mib=config.kv_cache_memory_mib,
        decode_workspace_mib=config.decode_workspace_mib,
        max_num_seqs=config.max_batch_size,
        max_prefill_batch_size=config.max_prefill_batch_size,
        max_prefill_tokens=config.max_prefill_tokens,
    )
    pool_name = config.instance_id or f"pdmesh-{os.getpid()}"

    def allocate(num_blocks: int, layout: KVLayout):
        return allocate_pool(
            config.transfer_backend, num_blocks, layout, name=pool_name, device=config.device
        )

    runner = EngineRunner(LLMEngine(engine_config, pool_allocator=allocate))
    runner.start()
    return runner


async def create_worker(config: WorkerConfig) -> Worker:
    runner = await asyncio.to_thread(build_runner, config)
    worker = Worker(config, runner)
    await worker.start()
    return worker


async def _serve(config: WorkerConfig) -> None:
    worker = await create_worker(config)
    await serve_until_signal(worker.server, on_stop=worker.stop)


def parse_args(argv: list[str] | None, role: str | None) -> WorkerConfig:
    """Flags over the environment (PDMESH_WORKER_*); exits with a one-line error on bad values."""
    parser = argparse.ArgumentParser(prog=f"pdmesh {role or 'mixed'}-worker", description="a pdmesh worker")
    add_config_flags(parser, WorkerConfig, skip=("role",) if role else ())
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    fixed = {"role": role} if role else {}
    return config_from_flags(parser, WorkerConfig, args, **fixed)


def run_worker(argv: list[str] | None = None, role: str | None = None) -> int:
    config = parse_args(argv, role)
    try:
        asyncio.run(_serve(config))
    except (OSError, ValueError) as exc:
        print(f"pdmesh worker: {exc}", file=sys.stderr)
        return 1
    return 0
