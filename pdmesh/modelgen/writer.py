"""``write_model``: a small random checkpoint in real Hugging Face layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from pdmesh.modelgen import deepseek_v3 as _deepseek_v3  # noqa: F401 - registers the arch
from pdmesh.modelgen import llama as _llama  # noqa: F401 - registers the arch
from pdmesh.modelgen import qwen2 as _qwen2  # noqa: F401 - registers the arch
from pdmesh.modelgen import qwen3 as _qwen3  # noqa: F401 - registers the arch
from pdmesh.modelgen import qwen3_moe as _qwen3_moe  # noqa: F401 - registers the arch
from pdmesh.modelgen.chat_templates import chat_template_for
from pdmesh.modelgen.registry import get_arch
from pdmesh.modelgen.tokenizer import tokenizer_vocab_size, write_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _preset_fields(writer, preset: str, overrides: dict) -> dict:
    if preset not in writer.presets:
        raise ValueError(f"unknown preset {preset!r} for {writer.name}; known: {', '.join(writer.presets)}")
    fields = {**writer.presets[preset], **overrides}
    if fields.get("vocab_size") is None:
        fields["vocab_size"] = tokenizer_vocab_size()
    if fields["vocab_size"] < tokenizer_vocab_size():
        raise ValueError(
            f"vocab_size {fields['vocab_size']} is smaller than the tokenizer's {tokenizer_vocab_size()}"
        )
    return fields


def write_model(
    arch: str,
    out_dir: Path | str,
    *,
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    **overrides,
) -> Path:
    """Writes a random ``arch`` checkpoint (config, safetensors, tokenizer, generation config) to ``out_dir``.

    ``overrides`` replace preset fields of config.json (e.g. ``num_hidden_layers=1``); ``init_std``
    sets the weights' standard deviation. Deterministic for the same arguments.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    writer = get_arch(arch)
    fields = _preset_fields(writer, preset, overrides)
    init_std = fields.pop("init_std", 0.05)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = write_tokenizer(out, chat_template=chat_template_for(arch))
    config = writer.build_config(fields, special, dtype)
    gen = torch.Generator().manual_seed(seed)
    weights = writer.build_weights({**config, "_init_std": init_std}, gen, DTYPES[dtype])
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {
        "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": [special["<|im_end|>"], special["<|endoftext|>"]],
        "pad_token_id": special["<|endoftext|>"],
        "transformers_version": config.get("transformers_version", "4.51.0"),
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s (%s, %s) to %s", arch, preset, dtype, out)
    return out


def write_shards(out_dir: Path | str, tensors: dict[str, torch.Tensor], shards: dict[str, list[str]]) -> None:
    """Writes ``tensors`` as Hugging Face's sharded layout: each ``shards`` file holds the listed
    names, and ``model.safetensors.index.json`` maps every name to its file."""
    out = Path(out_dir)
    weight_map: dict[str, str] = {}
    for file, names in shards.items():
        save_file({name: tensors[name] for name in names}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
