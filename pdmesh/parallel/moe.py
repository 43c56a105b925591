"""The three ways the ranks of an instance combine their routed experts' outputs (MoE dispatch).

Every rank holds some experts (``ExpertPlacement``), each cut to its moe_tp slice; a token's output
is the sum over its top-k experts of weight x expert(token), and an expert's output is the sum of
its moe_tp slices' outputs. The paths differ in what travels:

- ``all_reduce`` (tp only: one dp replica, so every rank sees every token): each rank computes its
  experts' weighted partial output for every token routed to them; one all-reduce over the
  instance sums the partials.
- ``all_gather`` (MindIE's ep_level 1): the replicas' tokens (with their routing) are gathered over
  the dp group, each rank computes its partials over all of them, a reduce-scatter over the dp
  group hands every replica its rows, and an all-reduce over the tp group adds the other tp ranks'
  partials.
- ``all_to_all`` (ep_level 2): each tp rank of a replica takes a share of its tokens; every (token,
  expert) pair travels only to the ranks that hold that expert (one per moe_tp slice). The counts
  go first (``all_to_all_single`` of one integer per rank), then the rows, unevenly, to the
  experts and the outputs back; the sender weights and sums them and an all-reduce over the tp
  group assembles the replica's tokens.

Routing ids are logical experts; ``dispatch`` turns each (token, expert) pair into one of that
expert's physical replicas (``pdmesh.parallel.eplb``) before any path runs, and counts the pairs
per expert for the balancer. Each equals the single-rank result up to the order of float
additions. A replica with no tokens this step calls ``dispatch`` with an empty batch, so it joins
every collective (``join_idle``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pdmesh.parallel import comm
from pdmesh.parallel.eplb import pick
from pdmesh.parallel.state import ParallelState, current

if TYPE_CHECKING:
    from pdmesh.models.moe import RoutedExperts


def _tables(experts: RoutedExperts, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The placement as tensors on ``device`` (built on first use: the model is built on meta):
    ep rank and slot of every physical expert, then each logical expert's replicas and their count."""
    cached = getattr(experts, "_placement_tensors", None)
    if cached is None or cached[0].device != device:
        p = experts.placement
        physical = torch.arange(p.num_physical, dtype=torch.long, device=device)
        cached = (physical // p.slots, physical % p.slots, *p.replica_table(device))
        experts._placement_tensors = cached
    return cached


def count_load(experts: RoutedExperts, ids: torch.Tensor) -> None:
    """Adds this replica's (token, expert) pairs to the layer's counts; one rank per replica
    counts (tp rank 0), so the counts summed over the ranks are the instance's."""
    if current().tp_rank != 0 or ids.numel() == 0:
        return
    step = torch.bincount(ids.reshape(-1), minlength=experts.num_experts)  # stays on the device: no sync
    load = getattr(experts, "load_counts", None)
    experts.load_counts = step if load is None else load + step


def local_partial(
    experts: RoutedExperts,
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[T, H]``: the weighted outputs of this rank's experts (its slices) for the tokens routed to
    them; zeros where none of a token's experts is here. ``valid [T]`` leaves padding rows out."""
    ep_of, slot_of = _tables(experts, x.device)[:2]
    k = ids.shape[1]
    flat = ids.reshape(-1)
    mine = ep_of[flat] == current().place.ep_rank
    if valid is not None:
        mine &= valid.repeat_interleave(k)
    pairs = mine.nonzero().squeeze(1)
    tokens = pairs // k
    rows = experts.expert_rows(x[tokens], slot_of[flat[pairs]])
    rows = rows * weights.reshape(-1)[pairs, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, rows)


def _all_gather(experts: RoutedExperts, x, weights, ids, state: ParallelState) -> torch.Tensor:
    counts = state.step_tokens or [x.shape[0]]
    k, hidden = ids.shape[1], x.shape[1]
    # one gather for the rows and their routing (ids exact as float32 below 2**24 experts)
    packed = torch.cat([x.float(), weights.float(), ids.float()], dim=1)
    gathered = comm.all_gather_dp(packed, counts)
    valid = None
    if state.dp > 1:  # replica d's rows start at d * longest; the rest of its stretch is padding
        longest = max(max(counts), 1)
        row = torch.arange(gathered.shape[0], device=x.device)
        valid = row % longest < torch.tensor(counts, device=x.device)[row // longest]
    xs = gathered[:, :hidden].to(x.dtype)
    ws = gathered[:, hidden : hidden + k]
    ids_all = gathered[:, hidden + k :].long()
    partial = local_partial(experts, xs, ws, ids_all, valid)
    return comm.all_reduce_tp(comm.reduce_scatter_dp(partial, counts))


def _share(total: int, parts: int, index: int) -> tuple[int, int]:
    """``[lo, hi)`` of the ``index``-th of ``parts`` near-equal shares of ``total`` rows."""
    return total * index // parts, total * (index + 1) // parts


def _all_to_all(experts: RoutedExperts, x, weights, ids, state: ParallelState) -> torch.Tensor:
    layout = state.layout
    lo, hi = _share(x.shape[0], state.tp, state.tp_rank)
    k, hidden = ids.shape[1], x.shape[1]
    ep_of, slot_of = _tables(experts, x.device)[:2]
    flat = ids[lo:hi].reshape(-1)
    copies = layout.moe_tp  # a pair goes to every slice of its expert
    tokens = torch.arange(hi - lo, device=x.device).repeat_interleave(k * copies)
    dest = (ep_of[flat] * copies)[:, None] + torch.arange(copies, device=x.device)[None, :]
    dest = dest.reshape(-1)
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=layout.world)
    slots = slot_of[flat].repeat_interleave(copies)[order]
    send = torch.cat([x[lo:hi][tokens[order]].float(), slots[:, None].float()], dim=1)
    recv_counts = comm.exchange_counts(send_counts)
    sends, recvs = send_counts.tolist(), recv_counts.tolist()
    received = comm.all_to_all(send, sends, recvs)
    outputs = experts.expert_rows(received[:, :hidden].to(x.dtype), received[:, hidden].long())
    back = comm.all_to_all(outputs, recvs, sends)
    pair_weights = weights[lo:hi].reshape(-1).repeat_interleave(copies)[order]
    own = torch.zeros((hi - lo, hidden), dtype=x.dtype, device=x.device)
    own.index_add_(0, tokens[order], back * pair_weights[:, None].to(x.dtype))
    full = torch.zeros_like(x)
    full[lo:hi] = own
    return comm.all_reduce_tp(full)


def dispatch(
    experts: RoutedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """The routed experts' output ``[T, H]`` for this rank's tokens, by the instance's path.

    ``ids`` are logical experts; each pair goes to one replica of its expert (``eplb.pick``)."""
    state = current()
    count_load(experts, ids)
    table, replicas = _tables(experts, x.device)[2:]
    ids = pick(ids, table, replicas)
    if state.moe_dispatch == "all_reduce":
        return comm.all_reduce_world(local_partial(experts, x, weights, ids))
    if state.moe_dispatch == "all_gather":
        return _all_gather(experts, x, weights, ids, state)
    if state.moe_dispatch == "all_to_all":
        return _all_to_all(experts, x, weights, ids, state)
    raise ValueError(f"unknown MoE dispatch {state.moe_dispatch!r}")
