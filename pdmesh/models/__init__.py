"""Model families as plain ``nn.Module``s over a paged KV cache, and the loader that picks one.

``MODEL_REGISTRY`` maps a config's ``architectures[0]`` to its class; add a family by writing its
module and registering it here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pdmesh.accelerator import resolve_device, resolve_dtype
from pdmesh.models.attention import AttentionMetadata
from pdmesh.models.config import ModelConfig
from pdmesh.models.deepseek_v3 import DeepseekV3ForCausalLM
from pdmesh.models.llama import LlamaForCausalLM
from pdmesh.models.loader import build_and_load
from pdmesh.models.qwen2 import Qwen2ForCausalLM
from pdmesh.models.qwen3 import Qwen3ForCausalLM
from pdmesh.models.qwen3_moe import Qwen3MoeForCausalLM

log = logging.getLogger(__name__)

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}


def register_model(arch: str, cls: type[nn.Module]) -> None:
    """Makes ``arch`` (a config's ``architectures[0]``) loadable."""
    MODEL_REGISTRY[arch] = cls


def load_model(
    model_dir: Path | str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelConfig]:
    """Loads a Hugging Face checkpoint directory into our implementation of its architecture."""
    path = Path(model_dir)
    cfg = ModelConfig.from_dir(path)
    cls = MODEL_REGISTRY.get(cfg.arch)
    if cls is None:
        raise ValueError(
            f"architecture {cfg.arch} is not supported; known: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    supported = getattr(cls, "rope_types", ("default",))
    if cfg.rope_type not in supported:
        raise ValueError(
            f"rope scaling {cfg.rope_type!r} is not supported for {cfg.arch} (only {', '.join(supported)})"
        )
    torch_dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    torch_device = resolve_device(device) if isinstance(device, str) else device
    model = build_and_load(cls, cfg, path, torch_dtype, torch_device)
    log.info(
        "loaded %s (%s) from %s as %s on %s", cfg.arch, cfg.fingerprint(), path, torch_dtype, torch_device
    )
    return model, cfg


__all__ = ["MODEL_REGISTRY", "AttentionMetadata", "ModelConfig", "load_model", "register_model"]
