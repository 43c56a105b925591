"""Mixture-of-experts building blocks: stacked expert weights and their batched computation.

Routed SwiGLU experts are stored stacked (``gate_up [E, 2*I, H]``, ``down [E, H, I]``) and loaded
from a checkpoint's per-expert tensors (``mlp.experts.{j}.gate_proj.weight`` ...) through
``expert_mapping``. ``RoutedExperts`` sorts the (token, expert) pairs by expert and runs one matmul
pair per expert that received tokens, then scatters the weighted outputs back with one
``index_add_``: no Python loop over tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pdmesh.models.threads import all_threads
from pdmesh.parallel.moe import dispatch
from pdmesh.parallel.state import current


def expert_mapping(num_experts: int) -> dict[str, tuple[str, str]]:
    """Checkpoint fragments of the per-expert tensors -> (stacked parameter, ``expert:projection``).

    Put it before the dense ``gate_proj``/``up_proj`` entries of a ``packed_modules_mapping``:
    ``.experts.3.gate_proj.`` must not fall to the dense fragment.
    """
    mapping: dict[str, tuple[str, str]] = {}
    for j in range(num_experts):
        mapping[f"experts.{j}.gate_proj"] = ("experts.gate_up", f"{j}:gate")
        mapping[f"experts.{j}.up_proj"] = ("experts.gate_up", f"{j}:up")
        mapping[f"experts.{j}.down_proj"] = ("experts.down", f"{j}:down")
    return mapping


class StackedExpertWeight(nn.Module):
    """One weight per local expert stacked as ``[E_local, rows, cols]``; loads per-expert checkpoint tensors.

    ``shard_rows`` maps a projection name to its first row (gate at 0, up at I for gate/up).
    A shard id is ``"{expert}:{projection}"``. Under expert parallelism ``slot_of`` maps a global
    expert to its local slots (a list: EPLB may keep replicas; empty or None: another rank holds
    it, the tensor is skipped); under moe_tp each
    expert keeps its ``moe_tp_rank``-th slice of the intermediate size: rows of gate/up, columns of
    the projections named in ``split_cols`` (down).
    """

    def __init__(
        self,
        num_experts: int,
        rows: int,
        cols: int,
        shard_rows: dict[str, int],
        slot_of: Callable[[int], int | list[int] | None] | None = None,
        inter_slice: tuple[int, int] | None = None,
        split_cols: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, rows, cols))
        self.shard_rows = shard_rows
        self.slot_of = slot_of or (lambda expert: expert)
        self.inter_slice = inter_slice  # (first, size) of the intermediate dimension kept here
        self.split_cols = split_cols

    def _slice(self, loaded: torch.Tensor, name: str) -> torch.Tensor:
        if self.inter_slice is None:
            return loaded
        first, size = self.inter_slice
        return loaded[:, first : first + size] if name in self.split_cols else loaded[first : first + size]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        expert, name = shard_id.split(":")
        slots = self.slot_of(int(expert))
        if slots is None or slots == []:
            return  # an expert another ep rank holds
        start = self.shard_rows[name]
        loaded = self._slice(loaded, name)
        if loaded.shape[1] != param.shape[2] or start + loaded.shape[0] > param.shape[1]:
            raise ValueError(
                f"expert shard {shard_id}: shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}"
            )
        for slot in slots if isinstance(slots, list) else [slots]:  # a replicated expert: each copy
            param.data[slot, start : start + loaded.shape[0]].copy_(loaded)

    def product(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """``x [M, cols]`` through local expert ``slot``'s weight (``int8.Int8StackedExperts`` has its twin)."""
        return F.linear(x, self.weight[slot])


class RoutedExperts(nn.Module):
    """The routed SwiGLU experts, each computed once over the tokens routed to it.

    On one rank every expert is here. Under expert parallelism (``moe_ep x moe_tp`` ranks) this
    rank holds the experts its ep rank's placement gives it, each cut to its moe_tp slice, and
    ``forward`` combines the ranks' partial outputs by the instance's dispatch path
    (``pdmesh.parallel.moe``).
    """

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        state = current()
        self.num_experts, self.hidden = num_experts, hidden
        if state.world == 1:
            self.placement, local, slot_of, inter_slice = None, num_experts, None, None
            self.inter = inter
        else:
            layout, place = state.layout, state.place
            self.placement = state.expert_placement(num_experts)
            local = self.placement.slots
            slot_of = self._slot_here
            self.inter = inter // layout.moe_tp
            inter_slice = (place.moe_tp_rank * self.inter, self.inter)
        self.gate_up = StackedExpertWeight(
            local, 2 * self.inter, hidden, {"gate": 0, "up": self.inter}, slot_of, inter_slice
        )
        self.down = StackedExpertWeight(
            local, hidden, self.inter, {"down": 0}, slot_of, inter_slice, split_cols=("down",)
        )

    def _slot_here(self, expert: int) -> list[int]:
        return self.placement.slots_here(expert, current().place.ep_rank)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``x [T, H]``, routing ``weights``/``ids [T, k]`` -> weighted sum of expert outputs ``[T, H]``."""
        if self.placement is not None:
            return dispatch(self, x, weights, ids)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        token_idx = order // ids.shape[1]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        outs = []
        with all_threads():  # the expert products, also inside a single-threaded decode step
            for expert, seg in enumerate(x[token_idx].split(counts)):
                if seg.shape[0] == 0:
                    continue
                gate, up = self.gate_up.product(seg, expert).split(self.inter, dim=-1)
                outs.append(self.down.product(F.silu(gate) * up, expert))
        y = torch.cat(outs) * weights.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_idx, y)

    def expert_rows(self, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Each row through its local expert ``slots[i]`` (this rank's slice), unweighted, in row order."""
        out = torch.empty_like(rows)
        if rows.shape[0] == 0:
            return out
        order = torch.argsort(slots, stable=True)
        counts = torch.bincount(slots, minlength=self.gate_up.weight.shape[0]).tolist()
        outs = []
        with all_threads():
            for slot, seg in enumerate(rows[order].split(counts)):
                if seg.shape[0]:
                    gate, up = self.gate_up.product(seg, slot).split(self.inter, dim=-1)
                    outs.append(self.down.product(F.silu(gate) * up, slot))
        out[order] = torch.cat(outs)
        return out


class SoftmaxTopKRouter(nn.Module):
    """Softmax (in float32) over the experts' logits, top-k, optionally renormalised (Qwen-MoE style)."""

    def __init__(self, num_experts: int, hidden: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, H]`` -> weights ``[T, k]`` (in ``x``'s dtype) and expert ids ``[T, k]``."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids
