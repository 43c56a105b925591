"""Qwen3 (dense): GQA attention with per-head QK RMSNorm, SwiGLU MLP, paged KV cache."""

from __future__ import annotations

from pdmesh.models.decoder import DecoderForCausalLM


class Qwen3ForCausalLM(DecoderForCausalLM):
    """Qwen3: the standard decoder with QK-norm; q/k/v/o biased only if ``attention_bias``."""

    qk_norm = True
