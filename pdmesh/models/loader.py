"""Declarative weight loading from safetensors (single file or sharded with an index; FP8, W8A8 INT8 or float)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pdmesh.models import fp8, int8_formats

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files, via ``model.safetensors.index.json`` when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no *.safetensors weights")
    return files


def checkpoint_target(name: str, mapping: dict[str, tuple[str, str]]) -> tuple[str, str | None]:
    """The model parameter a checkpoint tensor fills, and its shard id in a packed one (or None)."""
    for fragment, (replacement, shard_id) in mapping.items():
        if f".{fragment}." in name:
            return name.replace(f".{fragment}.", f".{replacement}."), shard_id
    return name, None


def _tensor_files(files: list[Path]) -> dict[str, Path]:
    """Which file holds each tensor (an FP8 weight's scale may lie in another shard)."""
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            where.update(dict.fromkeys(f.keys(), path))
    return where


def _read(where: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(where[name]), framework="pt", device="cpu") as f:
        return f.get_tensor(name)


def _checkpoint_tensor(f, name: str, where: dict[str, Path], block: tuple[int, int] | None) -> torch.Tensor:
    """Tensor ``name`` as stored, or dequantized when it is an FP8 weight with its tile scales."""
    tensor = f.get_tensor(name)
    if not fp8.is_quantized(tensor):
        return tensor
    scale_name = name + fp8.SCALE_SUFFIX
    if block is None or scale_name not in where:
        raise ValueError(f"tensor {name} is FP8 but the checkpoint has no block scale {scale_name} for it")
    return fp8.dequantize(tensor, _read(where, scale_name), block)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copies every checkpoint tensor into its parameter (calling a ``weight_loader`` for packed ones).

    FP8 block-quantized weights are dequantized (``fp8``); multi-token-prediction layers are skipped.
    Raises ValueError for a tensor the model has no place for, or a parameter never loaded.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    mapping = getattr(model, "packed_modules_mapping", {})
    raw = getattr(model.config, "raw", {})
    block = None if int8_formats.is_compressed_tensors(raw) else fp8.quantization_block(raw)
    files = safetensors_files(model_dir)
    where = _tensor_files(files)
    loaded: set[str] = set()
    skipped = 0
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if name.endswith(IGNORED_SUFFIXES) or (block and name.endswith(fp8.SCALE_SUFFIX)):
                    continue
                if fp8.is_mtp_tensor(name, raw, model.config.num_layers):
                    skipped += 1
                    continue
                target, shard_id = checkpoint_target(name, mapping)
                param = params.get(target)
                if param is None:
                    raise ValueError(
                        f"{path.name}: tensor {name} has no matching parameter in {type(model).__name__}"
                    )
                tensor = _checkpoint_tensor(f, name, where, block)
                module = model.get_submodule(target.rsplit(".", 1)[0])
                if shard_id is not None or getattr(module, "sharded", False):
                    module.weight_loader(param, tensor, shard_id)  # packed, or this rank's shard
                else:
                    if param.shape != tensor.shape:
                        raise ValueError(
                            f"{name}: shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                        )
                    param.data.copy_(tensor)
                loaded.add(target)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [n for n in params if n not in loaded and n not in tied]
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks {len(missing)} parameters, e.g. {missing[:3]}")
    if skipped:
        log.info("skipped %d multi-token-prediction tensors of %s", skipped, model_dir)
    log.debug("loaded %d tensors from %s", len(loaded), model_dir)


@torch.inference_mode()
def build_and_load(
    cls: type[nn.Module], cfg, model_dir: Path, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """Instantiates ``cls`` without initialising weights, loads the checkpoint, moves to device."""
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    model.tie_weights()
    names = set(_tensor_files(safetensors_files(model_dir)))
    if int8_formats.prepare(model, model_dir, names) is not None:
        log.info("int8 checkpoint: %s", model_dir)
    load_weights(model, model_dir)
    int8_formats.finalize(model)
    model.tie_weights()
    model = model.to(device).eval()
    model.setup(device, dtype)
    return model
