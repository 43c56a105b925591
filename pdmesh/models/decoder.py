"""The standard pre-norm decoder shared by the GQA families (Llama, Qwen2, Qwen3, Qwen3-MoE).

A family subclasses ``DecoderForCausalLM`` and states what differs through class attributes
(``qk_norm``, ``qkv_bias``/``o_bias``) and ``make_mlp`` (dense SwiGLU by default, a mixture of
experts for MoE layers). Parameter names follow Hugging Face's (``model.layers.{i}.self_attn...``)
except for the fused ``qkv_proj``/``gate_up_proj``, which ``packed_modules_mapping`` fills.
"""

from __future__ import annotations

import torch
from torch import nn

from pdmesh.kernels import cpu as cpu_kernels
from pdmesh.models.attention import AttentionMetadata, PagedAttention
from pdmesh.models.base import StackedCausalLM
from pdmesh.models.config import ModelConfig
from pdmesh.models.layers import GatedMLP, MergedLinear, RMSNorm, RotaryEmbedding
from pdmesh.models.parallel_layers import (
    ColumnParallelLinear,
    ColumnShard,
    embedding,
    heads_shard,
    lm_head,
    row_linear,
)
from pdmesh.models.threads import configured_threads
from pdmesh.parallel.layout import kv_head_range
from pdmesh.parallel.state import current

# checkpoint name fragment -> (our parameter fragment, shard id)
DENSE_PACKED_MODULES: dict[str, tuple[str, str]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


class GQAttention(nn.Module):
    """Fused q/k/v projection, optional per-head RMSNorm on q and k, rotary, paged attention.

    Under tensor parallelism the rank's q/k/v rows are its query heads and the KV heads they attend
    to (``kv_head_range``), and ``o_proj`` is row-parallel; ``nh``/``nkv`` are this rank's counts.
    """

    def __init__(self, cfg: ModelConfig, *, qk_norm: bool, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        tp = current().tp
        self.hd = cfg.head_dim
        self.nh = cfg.num_heads // tp
        kv_first, self.nkv = kv_head_range(cfg.num_kv_heads, tp, current().tp_rank)
        self.sizes = [self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd]
        if tp == 1:
            shards = dict(zip(("q", "k", "v"), self.sizes, strict=True))
            self.qkv_proj = MergedLinear(cfg.hidden_size, shards, bias=qkv_bias)
        else:
            kv = ColumnShard(cfg.num_kv_heads * self.hd, kv_first * self.hd, self.nkv * self.hd)
            column = {"q": heads_shard(cfg.num_heads, self.hd), "k": kv, "v": kv}
            self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, column, bias=qkv_bias)
        self.o_proj = row_linear(cfg.num_heads * self.hd, cfg.hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if qk_norm else None
        self.attn = PagedAttention(self.nh, self.nkv, self.hd)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, meta: AttentionMetadata
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        if cpu_kernels.enabled(qkv) and cpu_kernels.supports_rope(self.hd):
            return self._forward_fused(qkv, positions, rope, meta)
        q, k, v = qkv.split(self.sizes, dim=-1)
        q, k = q.view(t, self.nh, self.hd), k.view(t, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(positions, q, k)
        return self.o_proj(self.attn(q, k, v.view(t, self.nkv, self.hd), meta))

    def _forward_fused(
        self, qkv: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The q/k norms and rope as one CPU kernel over the fused projection's rows."""
        q_norm = (self.q_norm.weight, self.q_norm.eps) if self.q_norm is not None else None
        k_norm = (self.k_norm.weight, self.k_norm.eps) if self.k_norm is not None else None
        q, k = cpu_kernels.qk_norm_rope(
            qkv,
            self.nh,
            self.nkv,
            self.hd,
            positions,
            rope.cos,
            rope.sin,
            q_norm,
            k_norm,
            configured_threads(),
        )
        v = qkv[:, (self.nh + self.nkv) * self.hd :].view(qkv.shape[0], self.nkv, self.hd)
        return self.o_proj(self.attn(q, k, v, meta))


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP (dense or MoE) blocks with residuals."""

    def __init__(self, cfg: ModelConfig, attn: GQAttention, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self, h: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, rope, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """Embeddings, decoder layers, final norm (``layers`` built by the causal LM)."""

    def __init__(self, cfg: ModelConfig, layers: list[DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderForCausalLM(StackedCausalLM, nn.Module):
    """A causal LM over the standard decoder: ``forward`` returns hidden states, ``compute_logits``
    projects the chosen rows. Subclasses set the attention flags and may override ``make_mlp``."""

    qk_norm: bool = False
    packed_modules_mapping: dict[str, tuple[str, str]] = DENSE_PACKED_MODULES

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        layers = [
            DecoderLayer(cfg, self.make_attention(cfg), self.make_mlp(cfg, i)) for i in range(cfg.num_layers)
        ]
        self.model = DecoderModel(cfg, layers)
        self.lm_head = lm_head(cfg.vocab_size, cfg.hidden_size)
        self.rope: RotaryEmbedding | None = None

    def make_attention(self, cfg: ModelConfig) -> GQAttention:
        """One layer's attention; q/k/v and o carry a bias when the config's ``attention_bias`` says so."""
        bias = cfg.attention_bias
        return GQAttention(cfg, qk_norm=self.qk_norm, qkv_bias=bias, o_bias=bias)

    def make_mlp(self, cfg: ModelConfig, layer: int) -> nn.Module:
        """Layer ``layer``'s MLP: a dense SwiGLU of ``intermediate_size``."""
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        """Builds the rotary table (after the weights are on ``device``)."""
        self.rope = RotaryEmbedding.from_config(self.config, device, dtype)

    def bind_kv_cache(self, pool: torch.Tensor) -> None:
        """Points every layer at its K and V views of the pool ``[N, layers, 2, block, KVH, D]``."""
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.attn.bind(pool, i)
