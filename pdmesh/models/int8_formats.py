"""Which weights of a checkpoint are W8A8 INT8, in which scheme, and the modules that hold them.

Two formats:

- msModelSlim (Ascend): ``quant_model_description.json`` maps every tensor to its type; a weight
  is ``FLOAT``, ``W8A8`` (static: ``input_scale``, ``input_offset``, ``quant_bias``, ``deq_scale``,
  ``weight_scale``, ``weight_offset``) or ``W8A8_DYNAMIC`` (``weight_scale``, ``weight_offset``; the
  activations quantized per token at run time). Any other type is refused by name.
- compressed-tensors (``config.json`` ``quantization_config.quant_method: compressed-tensors``,
  format ``int-quantized``, as vLLM loads it): a weight is quantized when it has a ``weight_scale``
  (``[N, 1]`` per channel or ``[1]`` per tensor); static activations add ``input_scale``, dynamic
  ones are quantized per token. Only symmetric 8-bit integer groups are accepted.

``prepare`` swaps each quantized module for its int8 twin (``pdmesh.models.int8``) before the
loader fills it; ``finalize`` derives the run-time tensors afterwards. The twin is sharded as the
float module was: a column-parallel linear's rows, a row-parallel one's columns
(``int8_parallel``), the experts of this ep rank. Quantized experts run whole on each rank
(moe_tp 1): a down projection split over moe_tp ranks would quantize each slice on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from pdmesh.models.int8 import Int8Linear, Int8StackedExperts, _Int8Params
from pdmesh.models.int8_parallel import Int8RowLinear
from pdmesh.models.layers import MergedLinear
from pdmesh.models.moe import StackedExpertWeight
from pdmesh.models.parallel_layers import ColumnParallelLinear, RowParallelLinear
from pdmesh.parallel.state import current

DESCRIPTION_FILE = "quant_model_description.json"
MSMODELSLIM_TYPES = {"FLOAT": None, "W8A8": "static", "W8A8_DYNAMIC": "dynamic"}


@dataclass
class Int8Scheme:
    """A checkpoint's quantization: the format family and, per weight, static/dynamic or float."""

    family: str
    description: dict = field(default_factory=dict)  # msModelSlim's per-tensor types
    ct_scheme: str = ""  # compressed-tensors: the one activation scheme of its groups

    def kind_of(self, weight_name: str, names: set[str]) -> str | None:
        """``"static"``, ``"dynamic"`` or None (float) for checkpoint weight ``weight_name``."""
        if self.family == "msmodelslim":
            return MSMODELSLIM_TYPES[self.description.get(weight_name, "FLOAT")]
        return self.ct_scheme if weight_name.removesuffix("weight") + "weight_scale" in names else None


def _msmodelslim(description: dict) -> Int8Scheme:
    for name, kind in description.items():
        if name.endswith(".weight") and kind not in MSMODELSLIM_TYPES:
            raise ValueError(
                f"quantization type {kind!r} (for {name}) is not supported; known: {', '.join(MSMODELSLIM_TYPES)}"
            )
    return Int8Scheme("msmodelslim", description=description)


def _ct_group_scheme(name: str, group: dict) -> str:
    weights, acts = group.get("weights") or {}, group.get("input_activations") or {}
    for what, spec in (("weights", weights), ("input_activations", acts)):
        kind = (spec.get("num_bits"), spec.get("type"), spec.get("symmetric"))
        if kind != (8, "int", True):
            raise ValueError(
                f"compressed-tensors group {name}: {what} num_bits={kind[0]} type={kind[1]} "
                f"symmetric={kind[2]} is not supported (only symmetric 8-bit int)"
            )
    if weights.get("strategy") not in ("channel", "tensor"):
        raise ValueError(
            f"compressed-tensors group {name}: weight strategy {weights.get('strategy')!r} is not supported"
        )
    strategy = (bool(acts.get("dynamic")), acts.get("strategy"))
    if strategy == (True, "token"):
        return "dynamic"
    if strategy == (False, "tensor"):
        return "static"
    raise ValueError(
        f"compressed-tensors group {name}: activations dynamic={strategy[0]} strategy={strategy[1]!r} "
        "are not supported (dynamic per token or static per tensor)"
    )


def _compressed_tensors(quant: dict) -> Int8Scheme:
    fmt = quant.get("format")
    if fmt != "int-quantized":
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported (only int-quantized)")
    groups = quant.get("config_groups") or {}
    schemes = {_ct_group_scheme(name, group) for name, group in groups.items()}
    if len(schemes) != 1:
        raise ValueError(
            f"compressed-tensors needs one activation scheme over its groups, got {sorted(schemes) or 'none'}"
        )
    return Int8Scheme("compressed-tensors", ct_scheme=schemes.pop())


def is_compressed_tensors(raw_config: dict) -> bool:
    return (raw_config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def checkpoint_scheme(model_dir: Path, raw_config: dict) -> Int8Scheme | None:
    """The checkpoint's int8 scheme, None when it has none; ValueError naming what is unsupported."""
    description = Path(model_dir) / DESCRIPTION_FILE
    if description.exists():
        return _msmodelslim(json.loads(description.read_text()))
    if is_compressed_tensors(raw_config):
        return _compressed_tensors(raw_config["quantization_config"])
    return None


def _module_kinds(model: nn.Module, scheme: Int8Scheme, names: set[str]) -> dict[str, str]:
    """Module path -> scheme for every module whose checkpoint weights are quantized."""
    from pdmesh.models.loader import checkpoint_target  # the loader imports this module

    mapping = getattr(model, "packed_modules_mapping", {})
    kinds: dict[str, set] = {}
    for name in names:
        if not name.endswith(".weight"):
            continue
        target, _ = checkpoint_target(name, mapping)
        kinds.setdefault(target.rsplit(".", 1)[0], set()).add(scheme.kind_of(name, names))
    out = {}
    for path, found in kinds.items():
        if len(found) > 1:
            raise ValueError(f"the weights fused into {path} mix schemes {sorted(map(str, found))}")
        kind = found.pop()
        if kind is not None:
            out[path] = kind
    return out


def _int8_twin(path: str, module: nn.Module, family: str, kind: str) -> nn.Module:
    if getattr(module, "keep_dense_weight", False):
        raise ValueError(f"{path} is quantized, but the model reads its dense weight (keep it FLOAT)")
    # msModelSlim's static scheme folds the float bias into quant_bias
    bias = None if (family, kind) == ("msmodelslim", "static") else getattr(module, "bias", None)
    if isinstance(module, StackedExpertWeight):
        if current().layout.moe_tp > 1:
            raise ValueError(
                f"{path}: int8 experts run whole on each rank; use moe_tp=1 (moe_ep = the world size)"
            )
        experts, rows, cols = module.weight.shape
        return Int8StackedExperts(experts, rows, cols, module.shard_rows, family, kind, module.slot_of)
    if type(module) is ColumnParallelLinear:
        return Int8Linear(module.weight.shape[1], module.shards, family, kind, bias)
    if type(module) is RowParallelLinear:
        return Int8RowLinear(module.in_features, module.out_features, family, kind, bias)
    if type(module) is MergedLinear:
        sizes = {name: size for name, (_, size) in module.shard_offsets.items()}
        return Int8Linear(module.weight.shape[1], sizes, family, kind, bias)
    if type(module) is nn.Linear:
        return Int8Linear(module.in_features, {"all": module.out_features}, family, kind, bias)
    raise ValueError(f"{path} ({type(module).__name__}) cannot hold an int8 weight")


def prepare(model: nn.Module, model_dir: Path, names: set[str]) -> Int8Scheme | None:
    """Swaps the modules whose checkpoint weights are int8 for int8 ones; the scheme, or None."""
    scheme = checkpoint_scheme(model_dir, getattr(model.config, "raw", {}))
    if scheme is None:
        return None
    for path, kind in _module_kinds(model, scheme, names).items():
        parent_path, _, attr = path.rpartition(".")
        twin = _int8_twin(path, model.get_submodule(path), scheme.family, kind)
        setattr(model.get_submodule(parent_path), attr, twin)
    return scheme


def finalize(model: nn.Module) -> int:
    """Derives every int8 module's run-time tensors once loaded; how many modules are int8."""
    count = 0
    for module in model.modules():
        if isinstance(module, _Int8Params):
            module.finalize()
            count += 1
    return count


def quantized_nbytes(model: nn.Module) -> tuple[int, int]:
    """``(bytes the int8 modules hold, bytes their weights would take in float32)``."""
    held = dense = 0
    for module in model.modules():
        if isinstance(module, _Int8Params):
            held += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            dense += module.weight.numel() * 4
    return held, dense
