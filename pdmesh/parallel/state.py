"""This process's place in its instance: the layout, its rank, its process groups, per-step context.

One process is one rank, so the state is process-wide (as in vLLM and MindIE): ``current()`` is what
the model layers ask when they are built (how to shard) and when they run (which group to reduce
over). Without ``install`` the state is the single rank of an unsharded instance and every
collective is a no-op, so single-process engines and tests never touch torch.distributed.

The per-step context (``step_tokens``) tells the MoE layers how many tokens every dp replica runs
this step, so that a replica with no work still joins their collectives with an empty batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from pdmesh.parallel.eplb import ReplicaPlacement
from pdmesh.parallel.layout import ModelDims, ParallelLayout, RankPlace, build_layout

MoeDispatch = Literal["all_reduce", "all_gather", "all_to_all"]


@dataclass
class ParallelState:
    """One rank's layout, place and process groups (None where a group has one rank)."""

    layout: ParallelLayout
    rank: int
    moe_dispatch: MoeDispatch = "all_reduce"
    world_group: Any = None
    tp_group: Any = None  # this rank's replica
    dp_group: Any = None  # the ranks with this rank's tp rank
    redundant_experts: int = 0  # spare expert slots over the instance (EPLB replicas)
    eplb_window: int = 128  # steps of expert load the balancer looks back on
    step_tokens: list[int] | None = None  # tokens of every dp replica in the running step
    comm_s: float = 0.0  # seconds spent in collectives since the last reset
    comm_calls: int = 0

    @property
    def place(self) -> RankPlace:
        return self.layout.place(self.rank)

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def tp_rank(self) -> int:
        return self.place.tp_rank

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def dp_rank(self) -> int:
        return self.place.dp_rank

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def expert_placement(self, num_experts: int) -> ReplicaPlacement:
        """A MoE layer's first placement (contiguous, or with spares balanced for even loads);
        each layer keeps its own from then on, as the balancer moves its experts."""
        return ReplicaPlacement.initial(num_experts, self.layout.moe_ep, self.redundant_experts)


def single_rank_state() -> ParallelState:
    return ParallelState(build_layout(1, 1, 1, 1, 1, ModelDims(1, 1)), 0)


_state: ParallelState = single_rank_state()


def current() -> ParallelState:
    """This process's state (a single unsharded rank unless ``install`` was called)."""
    return _state


def install(state: ParallelState) -> None:
    """Makes ``state`` this process's (before the model is built)."""
    global _state
    _state = state


def reset() -> None:
    """Back to a single unsharded rank (tests that built a sharded model in-process)."""
    install(single_rank_state())


@contextmanager
def step_context(tokens: list[int]) -> Iterator[None]:
    """Tells the layers every replica's token count for the step run inside the block."""
    _state.step_tokens = tokens
    try:
        yield
    finally:
        _state.step_tokens = None
