"""Llama (2, 3, 3.1+): GQA attention without QK-norm, SwiGLU MLP, default or "llama3"-scaled rope.

``attention_bias`` adds a bias to q/k/v/o and ``mlp_bias`` to gate/up/down, as transformers'
``LlamaConfig`` defines them (both off in Meta's checkpoints).
"""

from __future__ import annotations

from torch import nn

from pdmesh.models.config import ModelConfig
from pdmesh.models.decoder import DecoderForCausalLM
from pdmesh.models.layers import GatedMLP


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama: the standard decoder; Llama 3.1-style rope scaling via ``rope_scaling.rope_type="llama3"``."""

    rope_types = ("default", "llama3")

    def make_mlp(self, cfg: ModelConfig, layer: int) -> nn.Module:
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=bool(cfg.raw.get("mlp_bias", False)))
