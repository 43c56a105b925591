"""Block-quantized FP8 checkpoints (DeepSeek-V3's released format), dequantized at load.

DeepSeek-V3's weights ship with ``quantization_config = {"quant_method": "fp8",
"weight_block_size": [128, 128], ...}``: most linear weights are ``float8_e4m3fn`` and each has a
sibling ``<name>_scale_inv`` holding one float32 factor per ``weight_block_size`` tile (edge tiles
may be partial); the real weight is the FP8 value times its tile's factor. The engine has no FP8
kernels, so the loader multiplies the tiles out once into the engine's dtype: memory and compute are
those of the dequantized model (bfloat16 for the real one).

The released checkpoints also carry the multi-token-prediction module as extra decoder layers
(``model.layers.{num_hidden_layers + i}``, ``num_nextn_predict_layers`` of them). The engine does
not speculate with it, so ``is_mtp_tensor`` tells the loader to skip those tensors.
"""

from __future__ import annotations

import re

import torch

SCALE_SUFFIX = "_scale_inv"
SUPPORTED_METHODS = ("fp8",)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def quantization_block(raw_config: dict) -> tuple[int, int] | None:
    """The checkpoint's FP8 tile ``(rows, cols)``, None when unquantized; ValueError when unsupported."""
    quant = raw_config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    if method not in SUPPORTED_METHODS:
        raise ValueError(
            f"quantization method {method!r} is not supported (only {', '.join(SUPPORTED_METHODS)})"
        )
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(
            f"quantization_config.weight_block_size must be two positive integers, got {block!r}"
        )
    return block[0], block[1]


def is_mtp_tensor(name: str, raw_config: dict, num_layers: int) -> bool:
    """True for a tensor of the multi-token-prediction layers stored after the decoder's layers."""
    if not raw_config.get("num_nextn_predict_layers"):
        return False
    match = _LAYER.match(name)
    return match is not None and int(match.group(1)) >= num_layers


def is_quantized(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``weight`` (FP8, ``[N, K]``) times its per-tile factors ``[ceil(N/bn), ceil(K/bk)]``, as float32."""
    rows, cols = weight.shape
    tiles = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != tiles:
        raise ValueError(
            f"scale of shape {tuple(scale_inv.shape)} for a {rows}x{cols} weight, expected {tiles}"
        )
    factors = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * factors
