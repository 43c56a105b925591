"""Per-architecture checkpoint writers: each arch registers its presets and how to build weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# build_config(preset_fields, special_ids, dtype) -> config.json dict
ConfigBuilder = Callable[[dict, dict[str, int], str], dict]
# build_weights(config, generator, dtype) -> {HF parameter name: tensor}
WeightBuilder = Callable[[dict, torch.Generator, torch.dtype], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ArchWriter:
    """How to write one architecture's random checkpoint."""

    name: str
    presets: dict[str, dict]
    build_config: ConfigBuilder
    build_weights: WeightBuilder


ARCH_WRITERS: dict[str, ArchWriter] = {}


def register_arch(writer: ArchWriter) -> ArchWriter:
    """Adds an architecture (called by each arch's module at import)."""
    ARCH_WRITERS[writer.name] = writer
    return writer


def get_arch(name: str) -> ArchWriter:
    """The writer for ``name``; ValueError listing the known ones otherwise."""
    try:
        return ARCH_WRITERS[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(sorted(ARCH_WRITERS))}") from None
