"""Mixture-of-experts building blocks: stacked expert weights and their batched computation.

Routed SwiGLU experts are stored stacked (``gate_up [E, 2*I, H]``, ``down [E, H, I]``) and loaded
from a checkpoint's per-expert tensors (``mlp.experts.{j}.gate_proj.weight`` ...) through
``expert_mapping``. ``RoutedExperts`` sorts the (token, expert) pairs by expert and runs one matmul
pair per expert that received tokens, then scatters the weighted outputs back with one
``index_add_``: no Python loop over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdmesh.models.threads import all_threads


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
    """One weight per expert stacked as ``[E, rows, cols]``; loads per-expert checkpoint tensors.

    ``shard_rows`` maps a projection name to its first row (gate at 0, up at I for gate/up).
    A shard id is ``"{expert}:{projection}"``.
    """

    def __init__(self, num_experts: int, rows: int, cols: int, shard_rows: dict[str, int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, rows, cols))
        self.shard_rows = shard_rows

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        expert, name = shard_id.split(":")
        start = self.shard_rows[name]
        if loaded.shape[1] != param.shape[2] or start + loaded.shape[0] > param.shape[1]:
            raise ValueError(
                f"expert shard {shard_id}: shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}"
            )
        param.data[int(expert), start : start + loaded.shape[0]].copy_(loaded)


class RoutedExperts(nn.Module):
    """The routed SwiGLU experts, each computed once over the tokens routed to it."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.num_experts, self.inter = num_experts, inter
        self.gate_up = StackedExpertWeight(num_experts, 2 * inter, hidden, {"gate": 0, "up": inter})
        self.down = StackedExpertWeight(num_experts, hidden, inter, {"down": 0})

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``x [T, H]``, routing ``weights``/``ids [T, k]`` -> weighted sum of expert outputs ``[T, H]``."""
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        token_idx = order // ids.shape[1]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        outs = []
        with all_threads():  # the expert products, also inside a single-threaded decode step
            for expert, seg in enumerate(x[token_idx].split(counts)):
                if seg.shape[0] == 0:
                    continue
                gate, up = F.linear(seg, self.gate_up.weight[expert]).split(self.inter, dim=-1)
                outs.append(F.linear(F.silu(gate) * up, self.down.weight[expert]))
        y = torch.cat(outs) * weights.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_idx, y)


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
