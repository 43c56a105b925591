"""``ModelConfig``: the fields of a Hugging Face ``config.json`` the model code needs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pdmesh.models.identity import checkpoint_digest
from pdmesh.parallel.layout import ModelDims


def _eos_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _rope_type(raw: dict) -> str:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    return str(params.get("rope_type") or params.get("type") or "default")


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or {}
    return float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0)


@dataclass
class ModelConfig:
    """Architecture sizes and special ids of one checkpoint."""

    name: str
    arch: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    raw: dict = field(default_factory=dict, repr=False)
    digest: str = ""  # the checkpoint's content digest (identity.py); empty when not read from a directory

    @classmethod
    def from_dict(cls, raw: dict, name: str = "model") -> ModelConfig:
        archs = raw.get("architectures") or [raw.get("model_type", "unknown")]
        heads = int(raw["num_attention_heads"])
        return cls(
            name=name,
            arch=archs[0],
            model_type=raw.get("model_type", ""),
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(raw),
            rope_type=_rope_type(raw),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            eos_token_ids=_eos_ids(raw.get("eos_token_id")),
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
            raw=raw,
        )

    @classmethod
    def from_dir(cls, model_dir: Path | str) -> ModelConfig:
        """Reads config.json, adding generation_config.json's eos ids when it has any."""
        path = Path(model_dir)
        config_file = path / "config.json"
        if not config_file.exists():
            raise ValueError(f"{path} has no config.json (not a Hugging Face checkpoint directory)")
        cfg = cls.from_dict(json.loads(config_file.read_text()), name=path.resolve().name)
        cfg.digest = checkpoint_digest(path)
        gen_file = path / "generation_config.json"
        if gen_file.exists():
            extra = _eos_ids(json.loads(gen_file.read_text()).get("eos_token_id"))
            cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(extra))
        return cfg

    def fingerprint(self) -> str:
        """Names the model in a KV layout: two engines may share KV only when these agree.

        The checkpoint's content digest, not its directory's name: the same weights under two paths
        agree, other weights under the same name do not.
        """
        return (
            f"{self.model_type}-{self.digest or self.name}:h{self.hidden_size}:l{self.num_layers}"
            f":q{self.num_heads}:kv{self.num_kv_heads}x{self.head_dim}:v{self.vocab_size}"
        )

    def parallel_dims(self) -> ModelDims:
        """The sizes a parallel layout must divide: heads, experts and the sharded MLP widths."""
        raw = self.raw
        experts = int(raw.get("num_experts") or raw.get("n_routed_experts") or 0)
        return ModelDims(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            num_experts=experts,
            intermediate_size=self.intermediate_size,
            moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0) if experts else 0,
            kv_replicated="kv_lora_rank" in raw,  # MLA: one latent row per token on every rank
        )
