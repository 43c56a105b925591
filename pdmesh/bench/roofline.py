"""``pdmesh bench engine``'s roofline: the bytes a decode step must read and this machine's copy bandwidth.

A decode step must at least read every weight once (the embedding table only for the batch's rows)
and the K/V of every cached token; over the measured step time that gives the achieved GB/s, and
over a large tensor copy's bandwidth (bytes read plus bytes written) the memory-bound upper limit.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pdmesh.accelerator import synchronize

MEMCPY_BYTES = 256 * 2**20
MEMCPY_REPEATS = 5


def measure_memcpy(device: torch.device, nbytes: int = MEMCPY_BYTES, repeats: int = MEMCPY_REPEATS) -> float:
    """Best of ``repeats`` large tensor copies, in GB/s counting bytes read plus bytes written."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def decode_step_bytes(engine: Any, batch: int, mean_context: float) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step must read at least, at ``mean_context`` tokens."""
    model = engine.model
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embed = embed if embed is not None else getattr(getattr(model, "model", None), "embed_tokens", None)
    seen: set[int] = set()
    weights = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            weights += p.numel() * p.element_size()
    # weights packed for oneDNN (cpu_linear) left an empty parameter behind
    weights += sum(
        m.packed_weight_nbytes
        for m in model.modules()
        if hasattr(m, "packed_weight_nbytes") and not m.weight.numel()
    )
    if embed is not None and not any(p is embed.weight for p in _lm_head_params(model)):
        row = embed.weight[0]
        weights += (
            -embed.weight.numel() * embed.weight.element_size() + batch * row.numel() * row.element_size()
        )
    elem = torch.empty((), dtype=engine.dtype).element_size()
    per_token = torch.Size(engine.block_shape).numel() // engine.config.block_size * elem
    return weights, int(batch * mean_context * per_token)


def _lm_head_params(model: Any) -> list[torch.Tensor]:
    head = getattr(model, "lm_head", None)
    return list(head.parameters()) if head is not None else []


def roofline(weights: int, kv: int, step_s: float, batch: int, memcpy_gbs: float) -> dict[str, Any]:
    """The memory-bandwidth view of one decode step."""
    step_bytes = weights + kv
    return {
        "weight_bytes": weights,
        "kv_bytes_per_decode_step": kv,
        "bytes_per_decode_step": step_bytes,
        "achieved_gbytes_per_s": step_bytes / step_s / 1e9,
        "memcpy_gbytes_per_s": memcpy_gbs,
        "roofline_step_ms": step_bytes / (memcpy_gbs * 1e9) * 1e3,
        "roofline_tokens_per_s": batch * memcpy_gbs * 1e9 / step_bytes,
        "engine_decode_tokens_per_s": batch / step_s,
    }
