"""Qwen3-MoE: Qwen3's attention (QK-norm) with sparse SwiGLU experts and no shared expert.

A layer is sparse when it is not in ``mlp_only_layers`` and ``(layer + 1) % decoder_sparse_step == 0``
(and ``num_experts > 0``), exactly as transformers' ``Qwen3MoeDecoderLayer`` decides; other layers use
a dense SwiGLU of ``intermediate_size``. The router takes a float32 softmax over ``num_experts``
logits, keeps the ``num_experts_per_tok`` best and renormalises them when ``norm_topk_prob``.
"""

from __future__ import annotations

import torch
from torch import nn

from pdmesh.models.config import ModelConfig
from pdmesh.models.decoder import DENSE_PACKED_MODULES, DecoderForCausalLM
from pdmesh.models.layers import GatedMLP
from pdmesh.models.moe import RoutedExperts, SoftmaxTopKRouter, expert_mapping


def is_sparse_layer(raw: dict, layer: int) -> bool:
    """Whether layer ``layer`` of a Qwen3-MoE config (``config.json`` dict) is a MoE layer."""
    mlp_only = raw.get("mlp_only_layers") or []
    step = int(raw.get("decoder_sparse_step") or 1)
    return layer not in mlp_only and int(raw.get("num_experts") or 0) > 0 and (layer + 1) % step == 0


class Qwen3MoeSparseBlock(nn.Module):
    """Router (``gate``) and routed ``experts``; the output is the routing-weighted expert sum."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        raw = cfg.raw
        num_experts = int(raw["num_experts"])
        self.gate = SoftmaxTopKRouter(
            num_experts,
            cfg.hidden_size,
            int(raw["num_experts_per_tok"]),
            bool(raw.get("norm_topk_prob", False)),
        )
        self.experts = RoutedExperts(num_experts, cfg.hidden_size, int(raw["moe_intermediate_size"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        return self.experts(x, weights, ids)


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    """Qwen3-MoE: the QK-norm decoder whose sparse layers use ``Qwen3MoeSparseBlock``."""

    qk_norm = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        # per-expert fragments first: ".experts.3.gate_proj." must not fall to the dense "gate_proj"
        self.packed_modules_mapping = {
            **expert_mapping(int(cfg.raw.get("num_experts") or 0)),
            **DENSE_PACKED_MODULES,
        }

    def make_mlp(self, cfg: ModelConfig, layer: int) -> nn.Module:
        if is_sparse_layer(cfg.raw, layer):
            return Qwen3MoeSparseBlock(cfg)
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size)
