"""This rank's engine, as a worker's leader and every other rank of an instance build it.

Library code, so that ``pdmesh bench engine``, the ranks a leader starts (``pdmesh.parallel.rank_main``)
and the worker service (``services.worker``) build the engine alike without importing the service.
"""

from __future__ import annotations

import logging
import os

from pdmesh.config import WorkerConfig
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine, StepExecutor
from pdmesh.kv.transfer.base import allocate_pool
from pdmesh.kv.types import KVLayout
from pdmesh.parallel import follower
from pdmesh.parallel.instance import InstancePlan, Leader


def make_engine(
    config: WorkerConfig, plan: InstancePlan | None = None, executor: StepExecutor | None = None
) -> LLMEngine:
    """The engine of this rank (its device, its shard of the model, its part of the KV pool)."""
    engine_config = EngineConfig(
        model_dir=config.model_dir,
        dtype=config.dtype,
        device=plan.device if plan is not None else config.device,
        block_size=config.block_size,
        kv_cache_memory_mib=config.kv_cache_memory_mib,
        decode_workspace_mib=config.decode_workspace_mib,
        max_num_seqs=config.max_batch_size,
        max_prefill_batch_size=config.max_prefill_batch_size,
        max_prefill_tokens=config.max_prefill_tokens,
        workload=config.role,
        linear_kernel=config.linear_kernel,
    )
    rank = plan.spec.rank if plan is not None else 0
    pool_name = (config.instance_id or f"pdmesh-{os.getpid()}") + (f"-r{rank}" if rank else "")

    def allocate(num_blocks: int, layout: KVLayout):
        return allocate_pool(
            config.transfer_backend, num_blocks, layout, name=pool_name, device=engine_config.device
        )

    return LLMEngine(engine_config, pool_allocator=allocate, executor=executor)


def open_engine(config: WorkerConfig, plan: InstancePlan | None = None) -> tuple[LLMEngine, Leader | None]:
    """This rank's engine; with a plan of several ranks, as their leader once every follower is up
    (``Leader.stop`` ends them). What a worker's leader rank and ``pdmesh bench engine`` run."""
    if plan is None:
        return make_engine(config), None
    leader = Leader(config, plan)
    try:
        engine = make_engine(config, plan, leader.executor)
        leader.executor.runner = engine.runner
        leader.wait_followers(int(engine.kv_pool.shape[0]))
    except BaseException:
        leader.stop()
        raise
    return engine, leader


def run_follower(config: WorkerConfig, plan: InstancePlan) -> int:
    """Serve as rank ``plan.spec.rank`` (not 0) of an instance until its leader ends the group."""
    _log_rank(plan.spec.rank)
    return follower.run(config, plan, lambda: make_engine(config, plan))


def _log_rank(rank: int) -> None:
    """A follower's log lines name its rank (they share the leader's log)."""
    formatter = logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
