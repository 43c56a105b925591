"""Random Qwen3 (dense) checkpoints in Hugging Face's layout."""

from __future__ import annotations

import torch

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


def build_config(fields: dict, special_ids: dict[str, int], dtype: str) -> dict:
    """A config.json like Qwen3-0.6B's, with the preset's sizes."""
    fields = dict(fields)
    fields.pop("init_std", None)
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|im_end|>"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_window_layers": fields["num_hidden_layers"],
        "model_type": "qwen3",
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "dtype": dtype,
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        **fields,
    }


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _norm_weight(dim: int, gen: torch.Generator) -> torch.Tensor:
    return 1.0 + 0.1 * torch.randn(dim, generator=gen)


def build_weights(cfg: dict, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter of Qwen3ForCausalLM under its Hugging Face name."""
    std = cfg.get("_init_std", 0.05)
    h, v, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _normal((v, h), 1.0, gen)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = _norm_weight(h, gen)
        w[p + "post_attention_layernorm.weight"] = _norm_weight(h, gen)
        w[p + "self_attn.q_proj.weight"] = _normal((nh * hd, h), std, gen)
        w[p + "self_attn.k_proj.weight"] = _normal((nkv * hd, h), std, gen)
        w[p + "self_attn.v_proj.weight"] = _normal((nkv * hd, h), std, gen)
        w[p + "self_attn.o_proj.weight"] = _normal((h, nh * hd), std, gen)
        w[p + "self_attn.q_norm.weight"] = _norm_weight(hd, gen)
        w[p + "self_attn.k_norm.weight"] = _norm_weight(hd, gen)
        w[p + "mlp.gate_proj.weight"] = _normal((inter, h), std, gen)
        w[p + "mlp.up_proj.weight"] = _normal((inter, h), std, gen)
        w[p + "mlp.down_proj.weight"] = _normal((h, inter), std, gen)
    w["model.norm.weight"] = _norm_weight(h, gen)
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = _normal((v, h), std, gen)
    return {k: t.to(dtype).contiguous() for k, t in w.items()}


register_arch(ArchWriter("qwen3", PRESETS, build_config, build_weights))
