"""Qwen3 (dense) as plain modules: GQA attention with QK-norm, SwiGLU MLP, paged KV cache."""

from __future__ import annotations

import torch
from torch import nn

from pdmesh.models.attention import AttentionMetadata, PagedAttention
from pdmesh.models.config import ModelConfig
from pdmesh.models.layers import MergedLinear, RMSNorm, RotaryEmbedding


class Qwen3Attention(nn.Module):
    """Fused q/k/v projection, per-head RMSNorm on q and k, rotary, paged attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        sizes = {"q": self.nh * self.hd, "k": self.nkv * self.hd, "v": self.nkv * self.hd}
        self.qkv_proj = MergedLinear(cfg.hidden_size, sizes, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.attn = PagedAttention(self.nh, self.nkv, self.hd)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, meta: AttentionMetadata
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = self.q_norm(q.view(t, self.nh, self.hd))
        k = self.k_norm(k.view(t, self.nkv, self.hd))
        q, k = rope(positions, q, k)
        return self.o_proj(self.attn(q, k, v.view(t, self.nkv, self.hd), meta))


class Qwen3MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) with gate and up fused."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate": self.inter, "up": self.inter})
        self.down_proj = nn.Linear(self.inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residuals."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(
        self, h: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, rope, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    """Embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3ForCausalLM(nn.Module):
    """The causal LM: ``forward`` returns hidden states, ``compute_logits`` projects chosen rows."""

    # checkpoint name fragment -> (our parameter fragment, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: RotaryEmbedding | None = None

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        """Builds the rotary table (after the weights are on ``device``)."""
        cfg = self.config
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, device, dtype)

    def bind_kv_cache(self, pool: torch.Tensor) -> None:
        """Points every layer at its K and V views of the pool ``[N, layers, 2, block, KVH, D]``."""
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.attn.bind(pool[:, i, 0], pool[:, i, 1])

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, positions, self.rope, meta)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
