"""Bringing up the ranks of one instance: the layout from the config and the model, the process
groups, and (on the leader) the control hub, the executor and the followers it waits for.

Both sides call ``plan_instance`` (pure: the same answer on every rank) and then ``join``; the
leader goes on with ``Leader.start``, a follower with ``pdmesh.parallel.follower.run``.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from pdmesh.accelerator import rank_device
from pdmesh.config import WorkerConfig
from pdmesh.models.config import ModelConfig
from pdmesh.parallel.control import ControlHub
from pdmesh.parallel.executor import GroupExecutor
from pdmesh.parallel.launch import LocalRanks, RankSpec, init_groups, make_store, rank_spec
from pdmesh.parallel.layout import ParallelLayout, build_layout
from pdmesh.parallel.state import MoeDispatch, ParallelState

log = logging.getLogger(__name__)

CONTROL_KEY = "pdmesh/control"  # "host:port token" of the leader's control hub, in the store


@dataclass
class InstancePlan:
    """What every rank of an instance agrees on before it joins the groups."""

    spec: RankSpec
    layout: ParallelLayout
    dispatch: MoeDispatch
    device: str  # this rank's device


def moe_sizes(config: WorkerConfig) -> tuple[int, int]:
    """``(moe_ep, moe_tp)``: as configured, or (dp, tp) when both are left at 1."""
    if config.moe_ep * config.moe_tp == 1:
        return config.dp, config.tp
    return config.moe_ep, config.moe_tp


def dispatch_for(config: WorkerConfig) -> MoeDispatch:
    if config.moe_dispatch != "auto":
        return config.moe_dispatch
    return "all_reduce" if config.dp == 1 else "all_gather"


def plan_instance(config: WorkerConfig, environ=None) -> InstancePlan:
    """This rank's place and the instance's layout; ValueError (``LayoutError``) naming the numbers."""
    spec = rank_spec(config, environ)
    moe_ep, moe_tp = moe_sizes(config)
    dims = ModelConfig.from_dir(config.model_dir).parallel_dims()
    layout = build_layout(spec.world, config.tp, config.dp, moe_ep, moe_tp, dims)
    return InstancePlan(spec, layout, dispatch_for(config), rank_device(config.device, spec.local_rank))


@dataclass
class Joined:
    """A rank inside its instance's groups (and the host's other ranks, if it started them)."""

    plan: InstancePlan
    state: ParallelState
    store: dist.Store
    local_ranks: LocalRanks | None = None


def join(
    config: WorkerConfig, plan: InstancePlan, before_groups: Callable[[dist.Store], None] | None = None
) -> Joined:
    """Opens the rendezvous, starts the host's other ranks, joins the process groups.

    ``before_groups(store)`` runs on rank 0 before it blocks in the groups' rendezvous (the leader
    publishes its control address there)."""
    spec = plan.spec
    store = make_store(spec, config.dist_timeout_s)
    local = None
    if spec.spawn:
        local = LocalRanks(config, spec, store.port if spec.rank == 0 else spec.master_port)
        local.on_exit = _abort_start  # until the caller watches them: the groups would wait in vain
    try:
        if before_groups is not None:
            before_groups(store)
        state = init_groups(spec, store, plan.layout, plan.device, plan.dispatch, config.dist_timeout_s)
        state.redundant_experts = config.num_redundant_experts
        state.eplb_window = config.eplb_window_steps
    except BaseException:
        if local is not None:
            local.stop()
        raise
    return Joined(plan, state, store, local)


class Leader:
    """Rank 0's hold on its instance: the control hub, the executor and the ranks it started."""

    def __init__(self, config: WorkerConfig, plan: InstancePlan) -> None:
        self.config = config
        self.plan = plan
        self.hub = ControlHub(
            _bind_host(plan.spec.master_addr), secrets.token_hex(16), list(range(1, plan.spec.world))
        )
        self.joined = join(config, plan, self._publish)
        self.executor = GroupExecutor(self.hub, self.joined.state)
        self.executor.eplb_interval = config.eplb_interval_steps
        if self.joined.local_ranks is not None:
            self.joined.local_ranks.on_exit = lambda rank, code: self.executor.mark_broken(
                f"rank {rank} exited with code {code}"
            )

    def _publish(self, store: dist.Store) -> None:
        store.set(CONTROL_KEY, f"{self.plan.spec.master_addr}:{self.hub.port} {self.hub.token}")

    @property
    def state(self) -> ParallelState:
        return self.joined.state

    def wait_followers(self, num_blocks: int) -> dict[int, dict]:
        """Blocks until every follower said hello; refuses one whose pool differs."""
        hellos = self.hub.accept_all(self.config.dist_timeout_s, lambda: self.executor.broken)
        for rank, hello in sorted(hellos.items()):
            if hello.get("num_blocks") != num_blocks:
                raise ValueError(
                    f"rank {rank} has {hello.get('num_blocks')} KV blocks, the leader {num_blocks}: "
                    "every rank must run the same settings"
                )
        log.info("all %d ranks of the instance are up", self.plan.spec.world)
        return hellos

    def endpoint(self, rank: int) -> str:
        return self.hub.hellos[rank]["endpoint"]

    def stop(self) -> None:
        """Tells the followers to stop, then ends the ranks this process started."""
        self.executor.close()
        if self.joined.local_ranks is not None:
            self.joined.local_ranks.stop()


def _abort_start(rank: int, code: int) -> None:
    """A rank died before the instance's groups formed: nothing can start, end now (bounded)."""
    log.error("rank %d exited with code %s while the instance was starting; giving up", rank, code)
    logging.shutdown()
    os._exit(1)


def _bind_host(master_addr: str) -> str:
    """Where the control hub listens: loopback for a one-host instance, every interface otherwise."""
    return master_addr if master_addr.startswith("127.") or master_addr == "localhost" else ""
