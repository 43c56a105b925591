"""Random DeepSeek-V3 checkpoints in Hugging Face's layout (per-expert tensors, like the real one)."""

from __future__ import annotations

import torch

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


def build_config(fields: dict, special_ids: dict[str, int], dtype: str) -> dict:
    """A config.json like DeepSeek-V3's, with the preset's sizes."""
    fields = dict(fields)
    fields.pop("init_std", None)
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|im_end|>"],
        "ep_size": 1,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_type": "deepseek_v3",
        "moe_layer_freq": 1,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 0,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_method": "noaux_tc",
        "torch_dtype": dtype,
        "dtype": dtype,
        "transformers_version": "4.51.0",
        "use_cache": True,
        **fields,
    }


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _norm_weight(dim: int, gen: torch.Generator) -> torch.Tensor:
    return 1.0 + 0.1 * torch.randn(dim, generator=gen)


def _attention_weights(cfg: dict, std: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    lora, q_lora = cfg["kv_lora_rank"], cfg.get("q_lora_rank")
    w: dict[str, torch.Tensor] = {}
    if q_lora:
        w["q_a_proj.weight"] = _normal((q_lora, h), std, gen)
        w["q_a_layernorm.weight"] = _norm_weight(q_lora, gen)
        w["q_b_proj.weight"] = _normal((nh * qk, q_lora), std, gen)
    else:
        w["q_proj.weight"] = _normal((nh * qk, h), std, gen)
    w["kv_a_proj_with_mqa.weight"] = _normal((lora + cfg["qk_rope_head_dim"], h), std, gen)
    w["kv_a_layernorm.weight"] = _norm_weight(lora, gen)
    w["kv_b_proj.weight"] = _normal((nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), lora), std, gen)
    w["o_proj.weight"] = _normal((h, nh * cfg["v_head_dim"]), std, gen)
    return w


def _swiglu_weights(h: int, inter: int, std: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "gate_proj.weight": _normal((inter, h), std, gen),
        "up_proj.weight": _normal((inter, h), std, gen),
        "down_proj.weight": _normal((h, inter), std, gen),
    }


def _moe_weights(cfg: dict, std: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, inter, experts = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    w = {
        "gate.weight": _normal((experts, h), std, gen),
        "gate.e_score_correction_bias": _normal((experts,), 0.1, gen),
    }
    for j in range(experts):
        for name, t in _swiglu_weights(h, inter, std, gen).items():
            w[f"experts.{j}.{name}"] = t
    shared = inter * cfg.get("n_shared_experts", 1)
    for name, t in _swiglu_weights(h, shared, std, gen).items():
        w[f"shared_experts.{name}"] = t
    return w


def build_weights(cfg: dict, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter of DeepseekV3ForCausalLM under its Hugging Face checkpoint name."""
    std = cfg.get("_init_std", 0.05)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _normal((v, h), 1.0, gen)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = _norm_weight(h, gen)
        w[p + "post_attention_layernorm.weight"] = _norm_weight(h, gen)
        for name, t in _attention_weights(cfg, std, gen).items():
            w[p + "self_attn." + name] = t
        if i < cfg.get("first_k_dense_replace", 0):
            mlp = _swiglu_weights(h, cfg["intermediate_size"], std, gen)
        else:
            mlp = _moe_weights(cfg, std, gen)
        for name, t in mlp.items():
            w[p + "mlp." + name] = t
    w["model.norm.weight"] = _norm_weight(h, gen)
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = _normal((v, h), std, gen)
    return {k: t.to(dtype).contiguous() for k, t in w.items()}


register_arch(ArchWriter("deepseek_v3", PRESETS, build_config, build_weights))
