"""DeepSeek-V3: MLA attention over a latent KV cache, and a mixture of experts with shared experts.

The MoE router scores experts with a sigmoid, adds ``e_score_correction_bias`` for the choice only,
keeps the ``topk_group`` best of ``n_group`` expert groups (a group scores the sum of its two best
experts), picks ``num_experts_per_tok`` experts among those, optionally renormalises their
(uncorrected) scores and multiplies by ``routed_scaling_factor``. The first
``first_k_dense_replace`` layers use a dense SwiGLU MLP instead.

Routed experts are ``moe.RoutedExperts``: stacked weights loaded from the checkpoint's per-expert
tensors (``mlp.experts.{j}.gate_proj.weight`` ...), computed per expert over the tokens routed to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdmesh.models.attention import AttentionMetadata
from pdmesh.models.base import StackedCausalLM
from pdmesh.models.config import ModelConfig
from pdmesh.models.layers import GatedMLP, RMSNorm
from pdmesh.models.mla import MLARotaryEmbedding, MLAttention
from pdmesh.models.moe import RoutedExperts, expert_mapping
from pdmesh.models.parallel_layers import embedding, lm_head


class GroupLimitedRouter(nn.Module):
    """Sigmoid scoring with a choice bias and group-limited top-k (DeepSeek-V3's ``noaux_tc``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        raw = cfg.raw
        self.num_experts = int(raw["n_routed_experts"])
        self.top_k = int(raw["num_experts_per_tok"])
        self.n_group = int(raw.get("n_group") or 1)
        self.topk_group = int(raw.get("topk_group") or self.n_group)
        self.norm_topk_prob = bool(raw.get("norm_topk_prob", True))
        self.scaling = float(raw.get("routed_scaling_factor", 1.0))
        self.weight = nn.Parameter(torch.empty(self.num_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.empty(self.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, H]`` -> float32 weights ``[T, k]`` and expert ids ``[T, k]``."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        per_group = self.num_experts // self.n_group
        group_scores = choice.view(-1, self.n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
        expert_mask = (
            group_mask.unsqueeze(-1).expand(-1, self.n_group, per_group).reshape(-1, self.num_experts)
        )
        choice = choice.masked_fill(~expert_mask, float("-inf"))
        ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids


class DeepseekV3MoE(nn.Module):
    """Routed experts plus always-on shared experts."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        raw = cfg.raw
        inter = int(raw["moe_intermediate_size"])
        self.gate = GroupLimitedRouter(cfg)
        self.experts = RoutedExperts(self.gate.num_experts, cfg.hidden_size, inter)
        self.shared_experts = GatedMLP(cfg.hidden_size, inter * int(raw.get("n_shared_experts") or 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        return self.experts(x, weights, ids) + self.shared_experts(x)


class DeepseekV3DecoderLayer(nn.Module):
    """Pre-norm MLA and MLP/MoE blocks with residuals."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        dense = index < int(cfg.raw.get("first_k_dense_replace") or 0)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size) if dense else DeepseekV3MoE(cfg)

    def forward(
        self, h: torch.Tensor, positions: torch.Tensor, rope: MLARotaryEmbedding, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, rope, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekV3Model(nn.Module):
    """Embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DeepseekV3DecoderLayer(cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3ForCausalLM(StackedCausalLM, nn.Module):
    """The causal LM over an MLA latent cache ``[N, layers, block, kv_lora_rank + qk_rope_head_dim]``."""

    kv_kind = "mla"
    rope_types = ("default", "yarn")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.kv_lora_rank = int(cfg.raw["kv_lora_rank"])
        self.rope_dim = int(cfg.raw["qk_rope_head_dim"])
        self.model = DeepseekV3Model(cfg)
        self.lm_head = lm_head(cfg.vocab_size, cfg.hidden_size)
        self.rope: MLARotaryEmbedding | None = None
        # per-expert fragments first: ".experts.3.gate_proj." must not fall to the dense "gate_proj"
        self.packed_modules_mapping = {
            **expert_mapping(int(cfg.raw.get("n_routed_experts") or 0)),
            "gate_proj": ("gate_up_proj", "gate"),
            "up_proj": ("gate_up_proj", "up"),
        }

    def kv_block_shape(self, block_size: int) -> tuple[int, ...]:
        """One latent row (``kv_lora_rank + qk_rope_head_dim``) per token per layer."""
        return (self.config.num_layers, block_size, self.kv_lora_rank + self.rope_dim)

    def kv_heads_and_dim(self) -> tuple[int, int]:
        return 1, self.kv_lora_rank + self.rope_dim

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        """Builds the rotary table (after the weights are on ``device``)."""
        self.rope = MLARotaryEmbedding(self.config, self.rope_dim, device, dtype)

    def bind_kv_cache(self, pool: torch.Tensor) -> None:
        """Points every layer at its latent view ``[N, block, L+R]`` of the pool."""
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.bind(pool[:, i])
