"""``pdmesh quantize``: a W8A8 INT8 copy of a float checkpoint, in msModelSlim's or compressed-tensors' format.

Every projection inside the decoder layers is quantized (attention, dense MLP, shared and routed
experts) except a weight the model reads whole (MLA's ``kv_b_proj``); embeddings, norms, routers and
the LM head stay float. Weights: symmetric int8 per output channel. Static schemes are calibrated
by one float prefill of fixed token sequences, recording each projection's input range
(msModelSlim's ``W8A8``: asymmetric per tensor, with an offset; compressed-tensors: symmetric).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pdmesh.models import AttentionMetadata, load_model
from pdmesh.models.int8 import QMAX, QMIN
from pdmesh.models.int8_formats import DESCRIPTION_FILE
from pdmesh.models.layers import MergedLinear
from pdmesh.models.loader import checkpoint_target, safetensors_files
from pdmesh.models.moe import StackedExpertWeight

FORMATS = ("msmodelslim-w8a8", "msmodelslim-w8a8-dynamic", "compressed-tensors")
CALIBRATION_SEQUENCES, CALIBRATION_LEN = 4, 48


class _Ranges:
    """Input (min, max) per quantizable module (per expert for stacked experts)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int], tuple[float, float]] = {}

    def add(self, key: tuple[str, int], x: torch.Tensor) -> None:
        lo, hi = float(x.min()), float(x.max())
        old = self.seen.get(key, (lo, hi))
        self.seen[key] = (min(lo, old[0]), max(hi, old[1]))

    def of(self, path: str, expert: int) -> tuple[float, float]:
        if (path, expert) in self.seen:
            return self.seen[(path, expert)]
        others = [r for (p, _), r in self.seen.items() if p == path]  # an expert no token reached
        if not others:
            raise ValueError(f"calibration never reached {path}")
        return min(r[0] for r in others), max(r[1] for r in others)


def _quantizable(path: str, module: nn.Module) -> bool:
    if ".layers." not in f".{path}" or getattr(module, "keep_dense_weight", False):
        return False
    return type(module) in (nn.Linear, MergedLinear) or isinstance(module, StackedExpertWeight)


def _calibrate(model: nn.Module, vocab: int) -> tuple[_Ranges, set[str]]:
    ranges, paths = _Ranges(), set()
    for path, module in model.named_modules():
        if not _quantizable(path, module):
            continue
        paths.add(path)
        if isinstance(module, StackedExpertWeight):
            dense = module.product

            def product(x, slot, _path=path, _dense=dense):
                ranges.add((_path, slot), x)
                return _dense(x, slot)

            module.product = product
        else:
            module.register_forward_pre_hook(lambda m, args, _path=path: ranges.add((_path, -1), args[0]))
    gen = torch.Generator().manual_seed(0)
    block, n = 16, CALIBRATION_LEN
    for _ in range(CALIBRATION_SEQUENCES):
        ids = torch.randint(0, vocab, (n,), generator=gen)
        num_blocks = -(-n // block)
        model.bind_kv_cache(torch.zeros((num_blocks, *model.kv_block_shape(block))))
        slots = torch.arange(n)
        meta = AttentionMetadata(
            True, slots // block, slots % block, torch.arange(num_blocks)[None, :], [n], [n]
        )
        with torch.inference_mode():
            model(ids, torch.arange(n), meta)
    return ranges, paths


def _weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-10) / QMAX
    return torch.round(w.float() / scale).clamp(QMIN, QMAX).to(torch.int8), scale


def _quantized_tensors(prefix: str, w: torch.Tensor, bias, rng: tuple[float, float], fmt: str) -> dict:
    w_q, w_scale = _weight_int8(w)
    out = {f"{prefix}.weight": w_q, f"{prefix}.weight_scale": w_scale}
    if fmt == "compressed-tensors-static":
        out[f"{prefix}.input_scale"] = torch.tensor([max(abs(rng[0]), abs(rng[1]), 1e-10) / QMAX])
    elif fmt == "msmodelslim-w8a8":
        lo, hi = min(rng[0], 0.0), max(rng[1], 0.0)
        scale = max(hi - lo, 1e-10) / (QMAX - QMIN)
        offset = float(round(QMIN - lo / scale))
        deq = scale * w_scale.reshape(-1)
        quant_bias = -offset * w_q.to(torch.int64).sum(dim=1)
        if bias is not None:
            quant_bias = quant_bias + torch.round(bias.float() / deq).to(torch.int64)
            bias = None  # folded
        out.update(
            {
                f"{prefix}.input_scale": torch.tensor([scale]),
                f"{prefix}.input_offset": torch.tensor([offset]),
                f"{prefix}.quant_bias": quant_bias.to(torch.int32),
                f"{prefix}.deq_scale": deq.float(),
            }
        )
    if fmt.startswith("msmodelslim"):
        out[f"{prefix}.weight_offset"] = torch.zeros_like(w_scale)
    if bias is not None:
        out[f"{prefix}.bias"] = bias
    return out


def _read_all(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return tensors


def _source_config(src: Path) -> dict:
    if not (src / "config.json").exists():
        raise ValueError(f"{src} has no config.json (not a Hugging Face checkpoint directory)")
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config") or (src / DESCRIPTION_FILE).exists():
        raise ValueError(f"{src} is already quantized")
    return config


def _quantized_state(src: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """The output tensors, msModelSlim's type of each, and how many weights became int8."""
    model, cfg = load_model(src, "float32", "cpu")
    ranges, paths = _calibrate(model, cfg.vocab_size)
    mapping = getattr(model, "packed_modules_mapping", {})
    tensors = _read_all(src)
    kind = "W8A8" if fmt == "msmodelslim-w8a8" else "W8A8_DYNAMIC"
    out: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    handled: set[str] = set()  # biases written (or folded) with their weight
    for name, tensor in tensors.items():
        target, shard = checkpoint_target(name, mapping)
        path = target.rsplit(".", 1)[0]
        if not name.endswith(".weight") or path not in paths or tensor.dim() != 2:
            continue
        prefix = name.removesuffix(".weight")
        expert = int(shard.split(":")[0]) if shard and ":" in shard else -1
        bias = tensors.get(prefix + ".bias")
        new = _quantized_tensors(prefix, tensor, bias, ranges.of(path, expert), fmt)
        out.update(new)
        types.update(dict.fromkeys(new, kind))
        handled.update((name, prefix + ".bias"))
    for name, tensor in tensors.items():
        if name not in handled:
            out[name], types[name] = tensor, "FLOAT"
    return out, types, len(handled) // 2


def _copy_side_files(src: Path, dst: Path) -> None:
    """config, tokenizer, generation config...: everything but the weights."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        weights = item.name.endswith(".safetensors") or item.name == "model.safetensors.index.json"
        if item.is_file() and not weights:
            shutil.copy2(item, dst / item.name)


def quantize_checkpoint(src: Path, dst: Path, fmt: str, static: bool = False) -> int:
    """Writes ``src`` quantized in format ``fmt`` to ``dst``; how many weights were quantized.

    ``static`` picks compressed-tensors' static per-tensor activations (default: dynamic per token).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "compressed-tensors" and static:
        fmt = "compressed-tensors-static"
    config = _source_config(src)
    out, types, count = _quantized_state(src, fmt)
    _copy_side_files(src, dst)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"))
    if fmt.startswith("compressed-tensors"):
        config["quantization_config"] = _ct_config(static=fmt.endswith("static"))
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    else:
        kind = "W8A8" if fmt == "msmodelslim-w8a8" else "W8A8_DYNAMIC"
        (dst / DESCRIPTION_FILE).write_text(json.dumps({"model_quant_type": kind, **types}, indent=2))
    return count


def _ct_config(static: bool) -> dict:
    """compressed-tensors' ``quantization_config`` for int8 W8A8 (llm-compressor's layout)."""
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    acts = {"num_bits": 8, "type": "int", "symmetric": True}
    acts.update(
        {"strategy": "tensor", "dynamic": False} if static else {"strategy": "token", "dynamic": True}
    )
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
        "ignore": ["lm_head"],
    }


def main(argv: list[str] | None = None) -> int:
    """``pdmesh quantize --in DIR --out DIR --format F``."""
    p = argparse.ArgumentParser(prog="pdmesh quantize", description=__doc__.splitlines()[0])
    p.add_argument("--in", dest="src", type=Path, required=True, help="float checkpoint directory")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument(
        "--static-activations",
        action="store_true",
        help="compressed-tensors: calibrated per-tensor input scales instead of dynamic per-token",
    )
    args = p.parse_args(argv)
    try:
        count = quantize_checkpoint(args.src, args.out, args.format, args.static_activations)
    except (ValueError, OSError) as exc:
        print(f"pdmesh quantize: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} to {args.out} ({count} weights int8)")
    return 0
