"""Random Qwen3-MoE checkpoints in Hugging Face's layout (per-expert tensors, like Qwen3-30B-A3B)."""

from __future__ import annotations

import torch

from pdmesh.modelgen.common import attention_weights, decoder_config, decoder_weights, normal, swiglu_weights
from pdmesh.modelgen.registry import ArchWriter, register_arch
from pdmesh.models.qwen3_moe import is_sparse_layer

# The tiny preset keeps layer 0 dense (``mlp_only_layers``) so both MLP kinds are exercised.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
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
        moe_intermediate_size=128,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=2048,
        vocab_size=None,
        init_std=0.05,
    ),
}

FAMILY = {
    "attention_bias": False,
    "output_router_logits": False,
    "rms_norm_eps": 1e-6,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "use_sliding_window": False,
}


def build_config(fields: dict, special_ids: dict[str, int], dtype: str) -> dict:
    """A config.json like Qwen3-30B-A3B's, with the preset's sizes."""
    family = {**FAMILY, "max_window_layers": fields["num_hidden_layers"]}
    return decoder_config("Qwen3MoeForCausalLM", "qwen3_moe", family, fields, special_ids, dtype)


def moe_tensors(cfg: dict, std: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``mlp.gate`` (router) and ``mlp.experts.{j}.*`` tensors of one sparse layer."""
    h, inter, experts = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    w = {"mlp.gate.weight": normal((experts, h), std, gen)}
    for j in range(experts):
        w |= swiglu_weights(f"mlp.experts.{j}.", h, inter, std, gen)
    return w


def layer_tensors(cfg: dict, layer: int, std: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer's attention (with QK-norm) and its sparse or dense MLP tensors."""
    w = attention_weights(cfg, std, gen, qk_norm=True)
    if is_sparse_layer(cfg, layer):
        return w | moe_tensors(cfg, std, gen)
    return w | swiglu_weights("mlp.", cfg["hidden_size"], cfg["intermediate_size"], std, gen)


def build_weights(cfg: dict, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter of Qwen3MoeForCausalLM under its Hugging Face name."""
    return decoder_weights(cfg, gen, dtype, layer_tensors)


register_arch(ArchWriter("qwen3_moe", PRESETS, build_config, build_weights))
