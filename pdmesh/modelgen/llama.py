"""Random Llama 3.x checkpoints in Hugging Face's layout (Llama 3.1-style "llama3" rope scaling)."""

from __future__ import annotations

import torch

from pdmesh.modelgen.common import attention_weights, decoder_config, decoder_weights, swiglu_weights
from pdmesh.modelgen.registry import ArchWriter, register_arch


def llama3_rope(factor: float, original_max_position_embeddings: int) -> dict:
    """A Llama 3.1-style ``rope_scaling`` block (Meta's low/high frequency factors 1 and 4)."""
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_max_position_embeddings,
    }


# Llama 3.1-8B's shape, scaled down: GQA, theta 500000, llama3 rope, untied embeddings (tied random
# embeddings of std 1 make greedy decoding repeat one token). The tiny preset's original context of
# 256 puts its 8 head_dim/2 frequencies in all three llama3 bands (kept, smoothed, divided by
# ``factor``); its max_position_embeddings stays small to keep the engine's tables small.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=512,
        rope_scaling=llama3_rope(8.0, 256),
        vocab_size=None,  # the tokenizer's
        init_std=0.1,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=768,
        max_position_embeddings=8192,
        rope_scaling=llama3_rope(8.0, 1024),
        vocab_size=None,
        init_std=0.05,
    ),
}

FAMILY = {
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
}


def build_config(fields: dict, special_ids: dict[str, int], dtype: str) -> dict:
    """A config.json like Llama-3.1-8B's, with the preset's sizes."""
    return decoder_config("LlamaForCausalLM", "llama", FAMILY, fields, special_ids, dtype)


def layer_tensors(cfg: dict, layer: int, std: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer's attention and SwiGLU tensors (biased only if the config asks)."""
    bias = bool(cfg.get("attention_bias"))
    w = attention_weights(cfg, std, gen, qkv_bias=bias, o_bias=bias)
    mlp_bias = bool(cfg.get("mlp_bias"))
    return w | swiglu_weights("mlp.", cfg["hidden_size"], cfg["intermediate_size"], std, gen, mlp_bias)


def build_weights(cfg: dict, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter of LlamaForCausalLM under its Hugging Face name."""
    return decoder_weights(cfg, gen, dtype, layer_tensors)


register_arch(ArchWriter("llama", PRESETS, build_config, build_weights))
