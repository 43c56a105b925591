"""A float64 numpy reference of the W8A8 arithmetic, for the tests to hold our int8 products against."""

from __future__ import annotations

import numpy as np
import torch


def reference_product(x: torch.Tensor, p: dict, scheme: str) -> np.ndarray:
    """float64: quantize the activations, multiply the integers exactly, dequantize."""
    x64 = x.double().numpy()
    w = p["weight"].numpy().astype(np.int64)
    if scheme == "dynamic":
        scale = np.maximum(np.abs(x64).max(axis=-1, keepdims=True), 1e-10) / 127
        x_q = np.clip(np.rint(x64 / scale), -128, 127).astype(np.int64)
        y = (x_q @ w.T) * scale * p["weight_scale"].double().numpy()
    else:
        in_scale, offset = float(p["input_scale"]), float(p["input_offset"])
        x_q = np.clip(np.rint(x64 / in_scale + offset), -128, 127).astype(np.int64)
        y = (x_q @ w.T + p["quant_bias"].numpy().astype(np.int64)) * p["deq_scale"].double().numpy()
    if p.get("bias") is not None:
        y = y + p["bias"].double().numpy()
    return y


def reference_int8_product(x: torch.Tensor, p: dict, scheme: str) -> torch.Tensor:
    """``reference_product`` in place of ``pdmesh.models.int8.int8_product`` (same signature)."""
    return torch.from_numpy(reference_product(x, p, scheme)).to(x.dtype)
