"""The collectives the sharded layers use, each a no-op on a group of one rank, each timed.

Every call is bounded by the timeout its process group was created with (``launch.init_groups``):
a rank that died makes the others' call fail at once (gloo sees the closed connection), one that
hangs makes it fail after the timeout. The seconds spent here are added to ``state.comm_s`` so that
``pdmesh bench engine`` can report which share of a step is communication.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from pdmesh.parallel.state import ParallelState, current


@contextmanager
def _timed(state: ParallelState) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        state.comm_s += time.perf_counter() - started
        state.comm_calls += 1


def all_reduce_tp(x: torch.Tensor) -> torch.Tensor:
    """Sums ``x`` over this rank's tp group (the replica), in place when it is contiguous."""
    state = current()
    if state.tp == 1:
        return x
    x = x.contiguous()
    with _timed(state):
        dist.all_reduce(x, group=state.tp_group)
    return x


def max_over_tp(x: torch.Tensor) -> torch.Tensor:
    """The elementwise max of ``x`` over this rank's tp group (a row-parallel int8 product's
    per-token scale: the max over the whole row, not just this rank's columns)."""
    state = current()
    if state.tp == 1:
        return x
    x = x.contiguous()
    with _timed(state):
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=state.tp_group)
    return x


def all_reduce_world(x: torch.Tensor) -> torch.Tensor:
    """Sums ``x`` over every rank of the instance."""
    state = current()
    if state.world == 1:
        return x
    x = x.contiguous()
    with _timed(state):
        dist.all_reduce(x, group=state.world_group)
    return x


def all_gather_dp(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of every replica (``counts[d]`` of them at replica ``d``) gathered over the dp group,
    each replica's padded to the longest: ``[dp * max(counts), ...]``."""
    state = current()
    if state.dp == 1:
        return x
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = x.new_empty((state.dp * longest, *x.shape[1:]))
    with _timed(state):
        dist.all_gather_into_tensor(out, padded, group=state.dp_group)
    return out


def reduce_scatter_dp(y: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Sums ``y`` (laid out as ``all_gather_dp`` returns) over the dp group; this replica's rows."""
    state = current()
    if state.dp == 1:
        return y
    longest = max(counts)
    out = y.new_empty((longest, *y.shape[1:]))
    with _timed(state):
        dist.reduce_scatter_tensor(out, y.contiguous(), group=state.dp_group)
    return out[: counts[state.dp_rank]]


def all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """Rows to every rank of the instance (``send_counts[r]`` to rank ``r``, in rank order); the rows
    every rank sent here, in rank order."""
    state = current()
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    with _timed(state):
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=state.world_group)
    return out


def exchange_counts(send_counts: torch.Tensor) -> torch.Tensor:
    """Each rank's ``send_counts[r]`` delivered to rank ``r``: how many rows every rank sends here."""
    state = current()
    out = torch.empty_like(send_counts)
    with _timed(state):
        dist.all_to_all_single(out, send_counts, group=state.world_group)
    return out


def gather_to_leader(x: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's ``x`` (equal shapes) on rank 0, in rank order; None on the other ranks."""
    state = current()
    if state.world == 1:
        return [x]
    parts = [torch.empty_like(x) for _ in range(state.world)] if state.is_leader else None
    with _timed(state):
        dist.gather(x.contiguous(), parts, dst=0, group=state.world_group)
    return parts


def barrier() -> None:
    state = current()
    if state.world > 1:
        with _timed(state):
            dist.barrier(group=state.world_group)
