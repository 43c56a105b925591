"""Random Qwen3 (dense) checkpoints in Hugging Face's layout."""

from __future__ import annotations

import torch

from pdmesh.modelgen.common import attention_weights, decoder_config, decoder_weights, swiglu_weights
from pdmesh.modelgen.registry import ArchWriter, register_arch

PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=512,
        vocab_size=None,  # the tokenizer's
        init_std=0.1,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=768,
        max_position_embeddings=2048,
        vocab_size=None,
        init_std=0.05,
    ),
    "bench": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1536,
        max_position_embeddings=4096,
        vocab_size=32000,
        init_std=0.05,
    ),
}


FAMILY = {
    "attention_bias": False,
    "rms_norm_eps": 1e-6,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "use_sliding_window": False,
}


def build_config(fields: dict, special_ids: dict[str, int], dtype: str) -> dict:
    """A config.json like Qwen3-0.6B's, with the preset's sizes."""
    family = {**FAMILY, "max_window_layers": fields["num_hidden_layers"]}
    return decoder_config("Qwen3ForCausalLM", "qwen3", family, fields, special_ids, dtype)


def layer_tensors(cfg: dict, layer: int, std: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer's attention (with QK-norm) and dense SwiGLU tensors."""
    w = attention_weights(cfg, std, gen, qk_norm=True)
    return w | swiglu_weights("mlp.", cfg["hidden_size"], cfg["intermediate_size"], std, gen)


def build_weights(cfg: dict, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter of Qwen3ForCausalLM under its Hugging Face name."""
    return decoder_weights(cfg, gen, dtype, layer_tensors)


register_arch(ArchWriter("qwen3", PRESETS, build_config, build_weights))
