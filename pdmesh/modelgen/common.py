"""Pieces shared by the writers of the standard decoder families (Qwen3, Qwen2, Llama, Qwen3-MoE).

``decoder_config`` builds a config.json from a family's fixed keys and a preset's sizes;
``decoder_weights`` draws every tensor of a pre-norm decoder under its Hugging Face name, asking
the family for each layer's attention and MLP tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# layer_tensors(config, layer index, std, generator) -> {name under "model.layers.{i}.": tensor}
LayerTensors = Callable[[dict, int, float, torch.Generator], dict[str, torch.Tensor]]


def normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def norm_weight(dim: int, gen: torch.Generator) -> torch.Tensor:
    """An RMSNorm weight near 1 (so the norms matter without dominating)."""
    return 1.0 + 0.1 * torch.randn(dim, generator=gen)


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def decoder_config(
    arch: str, model_type: str, family: dict, fields: dict, special_ids: dict[str, int], dtype: str
) -> dict:
    """config.json: common keys, then the family's fixed ``family`` keys, then the preset's ``fields``."""
    fields = {k: v for k, v in fields.items() if k != "init_std"}
    return {
        "architectures": [arch],
        "attention_dropout": 0.0,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|im_end|>"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_type": model_type,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "dtype": dtype,
        "transformers_version": "4.51.0",
        "use_cache": True,
        **family,
        **fields,
    }


def attention_weights(
    cfg: dict,
    std: float,
    gen: torch.Generator,
    *,
    qk_norm: bool = False,
    qkv_bias: bool = False,
    o_bias: bool = False,
) -> dict[str, torch.Tensor]:
    """``self_attn.*`` tensors: q/k/v/o projections, then optional QK-norm weights and biases."""
    h, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim(cfg)
    w = {
        "self_attn.q_proj.weight": normal((nh * hd, h), std, gen),
        "self_attn.k_proj.weight": normal((nkv * hd, h), std, gen),
        "self_attn.v_proj.weight": normal((nkv * hd, h), std, gen),
        "self_attn.o_proj.weight": normal((h, nh * hd), std, gen),
    }
    if qk_norm:
        w["self_attn.q_norm.weight"] = norm_weight(hd, gen)
        w["self_attn.k_norm.weight"] = norm_weight(hd, gen)
    if qkv_bias:
        for name, rows in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
            w[f"self_attn.{name}_proj.bias"] = normal((rows,), std, gen)
    if o_bias:
        w["self_attn.o_proj.bias"] = normal((h,), std, gen)
    return w


def swiglu_weights(
    prefix: str, h: int, inter: int, std: float, gen: torch.Generator, bias: bool = False
) -> dict[str, torch.Tensor]:
    """``{prefix}gate_proj/up_proj/down_proj`` tensors of one SwiGLU MLP (or expert)."""
    w = {
        f"{prefix}gate_proj.weight": normal((inter, h), std, gen),
        f"{prefix}up_proj.weight": normal((inter, h), std, gen),
        f"{prefix}down_proj.weight": normal((h, inter), std, gen),
    }
    if bias:
        w[f"{prefix}gate_proj.bias"] = normal((inter,), std, gen)
        w[f"{prefix}up_proj.bias"] = normal((inter,), std, gen)
        w[f"{prefix}down_proj.bias"] = normal((h,), std, gen)
    return w


def decoder_weights(
    cfg: dict, gen: torch.Generator, dtype: torch.dtype, layer_tensors: LayerTensors
) -> dict[str, torch.Tensor]:
    """Every parameter of a pre-norm decoder LM under its Hugging Face name (``lm_head`` unless tied)."""
    std = cfg.get("_init_std", 0.05)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal((v, h), 1.0, gen)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm_weight(h, gen)
        w[p + "post_attention_layernorm.weight"] = norm_weight(h, gen)
        for name, t in layer_tensors(cfg, i, std, gen).items():
            w[p + name] = t
    w["model.norm.weight"] = norm_weight(h, gen)
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = normal((v, h), std, gen)
    return {k: t.to(dtype).contiguous() for k, t in w.items()}
