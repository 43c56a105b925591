"""Qwen2 / Qwen2.5: GQA attention with biased q/k/v (no o bias, no QK-norm), SwiGLU MLP, plain rope.

Sliding-window attention (``use_sliding_window``) is not implemented; Qwen2 checkpoints ship with it
off, and ``load_model`` refuses one that turns it on.
"""

from __future__ import annotations

from pdmesh.models.config import ModelConfig
from pdmesh.models.decoder import DecoderForCausalLM, GQAttention


class Qwen2ForCausalLM(DecoderForCausalLM):
    """Qwen2: q/k/v always carry a bias and o never does, whatever ``attention_bias`` says."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.raw.get("use_sliding_window"):
            raise ValueError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
        super().__init__(cfg)

    def make_attention(self, cfg: ModelConfig) -> GQAttention:
        return GQAttention(cfg, qk_norm=False, qkv_bias=True, o_bias=False)
