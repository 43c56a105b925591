"""Multi-head latent attention (DeepSeek-V2/V3) over a paged latent cache, and its rotary embedding.

MLA caches, per token and layer, the compressed latent ``c`` (``kv_lora_rank`` values, after
``kv_a_layernorm``) and the rotated shared key part ``k_pe`` (``qk_rope_head_dim`` values): one row
of ``kv_lora_rank + qk_rope_head_dim`` values instead of full per-head K and V. The cache of one
layer is ``[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]``.

- prefill up-projects the latents with ``kv_b_proj`` into per-head K (``k_nope`` + shared ``k_pe``)
  and V and attends with causal SDPA, exactly as Hugging Face does;
- decode absorbs ``kv_b_proj``'s key half into the query (``q_nope @ W_UK``) and attends directly
  over the cached latents as one shared head (``[c, k_pe]`` keys, ``c`` values), then applies the
  value half (``W_UV``) to the attended latent, so the cache is never expanded.

Under tensor parallelism a rank computes its share of the heads (``q_b_proj``/``q_proj`` and
``kv_b_proj`` column-parallel, ``o_proj`` row-parallel); ``kv_a_proj_with_mqa`` is whole on every
rank, so the latent cache is the same, replicated, on each.

The rotary embedding follows transformers' ``DeepseekV3``: default or YaRN inverse frequencies,
the YaRN ``attention_factor`` on cos/sin, the ``mscale_all_dim`` factor on the softmax scale, and
DeepSeek's interleaved pair layout (``rope_interleave``, default True).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pdmesh.models.attention import AttentionMetadata
from pdmesh.models.config import ModelConfig
from pdmesh.models.layers import RMSNorm, default_inv_freq
from pdmesh.models.parallel_layers import column_heads_linear, row_linear
from pdmesh.parallel.state import current


def rope_parameters(cfg: ModelConfig) -> dict:
    """The checkpoint's rope scaling dict (``rope_parameters`` or legacy ``rope_scaling``), or {}."""
    return dict(cfg.raw.get("rope_parameters") or cfg.raw.get("rope_scaling") or {})


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context extended by ``scale``."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_factor(cfg: ModelConfig, params: dict) -> float:
    factor = params.get("factor")
    if factor is None:
        return cfg.max_position_embeddings / _original_max_positions(cfg, params)
    return float(factor)


def _original_max_positions(cfg: ModelConfig, params: dict) -> int:
    original = cfg.raw.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings"
    )
    return int(original or cfg.max_position_embeddings)


def _yarn_inv_freq(cfg: ModelConfig, params: dict, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies and cos/sin attention factor, as transformers computes them."""
    base, factor = cfg.rope_theta, _yarn_factor(cfg, params)
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1
    original = _original_max_positions(cfg, params)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def mla_inv_freq(cfg: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq [dim/2], attention_factor)`` for the config's rope type ("default" or "yarn")."""
    if cfg.rope_type == "default":
        return default_inv_freq(dim, cfg.rope_theta), 1.0
    if cfg.rope_type == "yarn":
        return _yarn_inv_freq(cfg, rope_parameters(cfg), dim)
    raise ValueError(f"rope type {cfg.rope_type!r} is not supported for MLA (default or yarn)")


def softmax_scale(cfg: ModelConfig, qk_head_dim: int) -> float:
    """``qk_head_dim**-0.5``, times ``yarn_get_mscale(factor, mscale_all_dim)**2`` under rope scaling."""
    scale = qk_head_dim**-0.5
    params = rope_parameters(cfg)
    if cfg.rope_type != "default" and params.get("mscale_all_dim"):
        scale *= yarn_get_mscale(_yarn_factor(cfg, params), params["mscale_all_dim"]) ** 2
    return scale


class MLARotaryEmbedding:
    """Rotary table for the ``qk_rope_head_dim`` part; interleaved pairs or rotate-half layout."""

    def __init__(self, cfg: ModelConfig, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        inv_freq, attention_factor = mla_inv_freq(cfg, dim)
        positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :]
        self.cos = (freqs.cos() * attention_factor).to(device=device, dtype=dtype)  # [P, dim/2]
        self.sin = (freqs.sin() * attention_factor).to(device=device, dtype=dtype)
        self.interleave = bool(cfg.raw.get("rope_interleave", True))

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotates ``x [T, heads, dim]`` by its positions ``[T]``.

        Interleaved: pairs ``(x0, x1), (x2, x3), ...`` share a frequency and the result is laid out
        de-interleaved (rotated evens, then odds), as transformers' ``apply_rotary_pos_emb_interleave``.
        """
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class MLAttention(nn.Module):
    """DeepSeek MLA: low-rank q (optional), compressed kv latent cached with the rope key."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        raw = cfg.raw
        heads = cfg.num_heads
        self.nh = heads // current().tp  # this rank's heads; the latent cache is whole on every rank
        self.q_lora_rank = raw.get("q_lora_rank")
        self.kv_lora_rank = int(raw["kv_lora_rank"])
        self.nope_dim = int(raw["qk_nope_head_dim"])
        self.rope_dim = int(raw["qk_rope_head_dim"])
        self.v_dim = int(raw["v_head_dim"])
        qk_dim = self.nope_dim + self.rope_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = column_heads_linear(self.q_lora_rank, heads, qk_dim)
        else:
            self.q_proj = column_heads_linear(h, heads, qk_dim)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = column_heads_linear(self.kv_lora_rank, heads, self.nope_dim + self.v_dim)
        self.kv_b_proj.keep_dense_weight = True  # decode reads it to absorb W_UK / W_UV
        self.o_proj = row_linear(heads * self.v_dim, h, bias=bias)
        self.scale = softmax_scale(cfg, qk_dim)
        self.cache: torch.Tensor | None = None  # [num_blocks, block_size, kv_lora_rank + rope_dim]

    def bind(self, cache: torch.Tensor) -> None:
        self.cache = cache

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return self.q_proj(x)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: MLARotaryEmbedding, meta: AttentionMetadata
    ) -> torch.Tensor:
        """``x [T, hidden]`` -> ``[T, hidden]``; writes the tokens' latent rows into the cache."""
        t = x.shape[0]
        q_nope, q_pe = self._query(x).view(t, self.nh, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        rows = torch.cat(
            [self.kv_a_layernorm(latent), rope.rotate(positions, k_pe.unsqueeze(1)).squeeze(1)], -1
        )
        q_pe = rope.rotate(positions, q_pe)
        self.cache[meta.slot_blocks, meta.slot_offsets] = rows
        if meta.is_prefill:
            out = self._prefill(torch.cat([q_nope, q_pe], dim=-1), rows, meta)
        else:
            out = self._decode(q_nope, q_pe, meta)
        return self.o_proj(out.reshape(t, self.nh * self.v_dim))

    def _expand(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent rows ``[S, L+R]`` -> per-head keys ``[H, S, nope+rope]`` and values ``[H, S, v]``."""
        s = rows.shape[0]
        latent, k_pe = rows.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(s, self.nh, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(s, self.nh, self.rope_dim)], dim=-1)
        return k.transpose(0, 1), v.transpose(0, 1)

    def _gather(self, block_table: torch.Tensor, length: int) -> torch.Tensor:
        """One sequence's first ``length`` cached latent rows ``[length, L+R]``."""
        num_blocks = -(-length // self.cache.shape[1])
        blocks = self.cache.index_select(0, block_table[:num_blocks])
        return blocks.reshape(-1, self.cache.shape[-1])[:length]

    def _prefill(self, q: torch.Tensor, rows: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Per sequence: up-projected causal attention over its cached prefix and new tokens."""
        outs, start = [], 0
        for i, (n, ctx) in enumerate(zip(meta.query_lens, meta.context_lens, strict=True)):
            qi = q[start : start + n].transpose(0, 1)
            if ctx == n:
                k, v = self._expand(rows[start : start + n])
                o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=self.scale)
            else:
                k, v = self._expand(self._gather(meta.block_tables[i], ctx))
                q_pos = torch.arange(ctx - n, ctx, device=q.device)
                mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
                o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=self.scale)
            outs.append(o.transpose(0, 1))
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One token per sequence, attending over the latent cache with ``kv_b_proj`` absorbed."""
        b = q_nope.shape[0]
        w = self.kv_b_proj.weight.view(self.nh, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]
        q_latent = torch.einsum("bhd,hdl->bhl", q_nope, w_uk)
        query = torch.cat([q_latent, q_pe], dim=-1).unsqueeze(2)  # [B, H, 1, L+R]
        blocks = self.cache.index_select(0, meta.block_tables.reshape(-1))  # row copies, not indexing
        keys = blocks.view(b, 1, -1, self.cache.shape[-1])  # [B, 1, S, L+R]
        values = keys[..., : self.kv_lora_rank]
        o = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=meta.decode_mask, scale=self.scale, enable_gqa=True
        )
        return torch.einsum("bhl,hvl->bhv", o.squeeze(2), w_uv)
