"""Random DeepSeek-V3 checkpoints in Hugging Face's layout (per-expert tensors, like the real one)."""

from __future__ import annotations

import torch

from pdmesh.modelgen.common import decoder_config, decoder_weights, norm_weight, normal, swiglu_weights
from pdmesh.modelgen.registry import ArchWriter, register_arch

# A YaRN-extended context like DeepSeek-V3's (factor 40 over 4096), scaled down. The tiny preset's
# mscale != mscale_all_dim also exercises the cos/sin attention factor (V3 itself uses 1.0 for both,
# which leaves only the softmax-scale correction).
TINY_YARN = dict(
    type="yarn",
    factor=4.0,
    original_max_position_embeddings=128,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=0.8,
)
SMALL_YARN = dict(
    type="yarn",
    factor=4.0,
    original_max_position_embeddings=512,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=1.0,
)

PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        max_position_embeddings=512,
        rope_scaling=TINY_YARN,
        vocab_size=None,  # the tokenizer's
        init_std=0.1,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        intermediate_size=768,
        moe_intermediate_size=128,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        max_position_embeddings=2048,
        rope_scaling=SMALL_YARN,
        vocab_size=None,
        init_std=0.05,
    ),
}


FAMILY = {
    "attention_bias": False,
    "ep_size": 1,
    "moe_layer_freq": 1,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 0,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
}


def build_config(fields: dict, special_ids: dict[str, int], dtype: str) -> dict:
    """A config.json like DeepSeek-V3's, with the preset's sizes."""
    return decoder_config("DeepseekV3ForCausalLM", "deepseek_v3", FAMILY, fields, special_ids, dtype)


def _attention_weights(cfg: dict, std: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """MLA's ``self_attn.*`` tensors (q through ``q_a``/``q_b`` when ``q_lora_rank`` is set)."""
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    lora, q_lora = cfg["kv_lora_rank"], cfg.get("q_lora_rank")
    w: dict[str, torch.Tensor] = {}
    if q_lora:
        w["q_a_proj.weight"] = normal((q_lora, h), std, gen)
        w["q_a_layernorm.weight"] = norm_weight(q_lora, gen)
        w["q_b_proj.weight"] = normal((nh * qk, q_lora), std, gen)
    else:
        w["q_proj.weight"] = normal((nh * qk, h), std, gen)
    w["kv_a_proj_with_mqa.weight"] = normal((lora + cfg["qk_rope_head_dim"], h), std, gen)
    w["kv_a_layernorm.weight"] = norm_weight(lora, gen)
    w["kv_b_proj.weight"] = normal((nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), lora), std, gen)
    w["o_proj.weight"] = normal((h, nh * cfg["v_head_dim"]), std, gen)
    return {f"self_attn.{name}": t for name, t in w.items()}


def _moe_weights(cfg: dict, std: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Router (with its choice bias), per-expert SwiGLUs and the shared experts, under ``mlp.``."""
    h, inter, experts = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    w = {
        "mlp.gate.weight": normal((experts, h), std, gen),
        "mlp.gate.e_score_correction_bias": normal((experts,), 0.1, gen),
    }
    for j in range(experts):
        w.update(swiglu_weights(f"mlp.experts.{j}.", h, inter, std, gen))
    shared = inter * (cfg.get("n_shared_experts") or 1)
    w.update(swiglu_weights("mlp.shared_experts.", h, shared, std, gen))
    return w


def _layer_tensors(cfg: dict, layer: int, std: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    w = _attention_weights(cfg, std, gen)
    if layer < (cfg.get("first_k_dense_replace") or 0):
        w.update(swiglu_weights("mlp.", cfg["hidden_size"], cfg["intermediate_size"], std, gen))
    else:
        w.update(_moe_weights(cfg, std, gen))
    return w


def build_weights(cfg: dict, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter of DeepseekV3ForCausalLM under its Hugging Face checkpoint name."""
    return decoder_weights(cfg, gen, dtype, _layer_tensors)


register_arch(ArchWriter("deepseek_v3", PRESETS, build_config, build_weights))
