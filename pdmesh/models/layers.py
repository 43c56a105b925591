"""Building blocks shared by the model families: norms, rotary embeddings, fused linears."""

from __future__ import annotations

import math

import torch
from torch import nn

from pdmesh.kernels import cpu as cpu_kernels
from pdmesh.models.config import ModelConfig
from pdmesh.models.parallel_layers import ColumnParallelLinear, even_shard, row_linear
from pdmesh.models.threads import configured_threads
from pdmesh.parallel.state import current


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, exactly as Hugging Face's."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if cpu_kernels.enabled(x) and x.stride(-1) == 1:
            return cpu_kernels.rms_norm(x, self.weight, self.eps, configured_threads())
        if dtype == torch.float32:  # one fused op, the same values as the steps below
            return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Unscaled rotary inverse frequencies ``theta ** (-2i / head_dim)`` (float32, as transformers)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    return 1.0 / (theta**exponent)


def llama3_inv_freq(head_dim: int, theta: float, params: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent rope scaling, as transformers' ``_compute_llama3_parameters``.

    Wavelengths shorter than ``original_max_position_embeddings / high_freq_factor`` stay, those
    longer than ``original / low_freq_factor`` are divided by ``factor``, and the band between is
    interpolated smoothly.
    """
    inv_freq = default_inv_freq(head_dim, theta)
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """The inverse frequencies ``cfg``'s rope type asks for ("default" or "llama3")."""
    if cfg.rope_type == "default":
        return default_inv_freq(cfg.head_dim, cfg.rope_theta)
    if cfg.rope_type == "llama3":
        params = cfg.raw.get("rope_parameters") or cfg.raw.get("rope_scaling")
        return llama3_inv_freq(cfg.head_dim, cfg.rope_theta, params)
    raise ValueError(f"rope type {cfg.rope_type!r} is not implemented here")


class RotaryEmbedding:
    """Rotary position embedding with a cos/sin table per position (default inverse frequencies
    unless ``inv_freq`` is given, e.g. by ``rope_inv_freq`` for a scaled rope)."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        max_positions: int,
        device: torch.device,
        dtype: torch.dtype,
        inv_freq: torch.Tensor | None = None,
    ):
        if inv_freq is None:
            inv_freq = default_inv_freq(head_dim, theta)
        inv_freq = inv_freq.to(device=device, dtype=torch.float)
        positions = torch.arange(max_positions, device=device, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)

    @classmethod
    def from_config(cls, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> RotaryEmbedding:
        """The table for ``cfg``'s head size, theta, context length and rope scaling."""
        return cls(
            cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, device, dtype, rope_inv_freq(cfg)
        )

    def __call__(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates q ``[T, H, D]`` and k ``[T, KVH, D]`` by their positions ``[T]``."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def shard_offsets(shard_sizes: dict[str, int]) -> tuple[dict[str, tuple[int, int]], int]:
    """``({shard: (first row, rows)}, total rows)`` of projections stored one after another."""
    offsets, offset = {}, 0
    for name, size in shard_sizes.items():
        offsets[name] = (offset, size)
        offset += size
    return offsets, offset


class MergedLinear(nn.Module):
    """Several projections of the same input stored as one weight (e.g. q/k/v, gate/up), biased or not.

    ``weight_loader`` places a checkpoint's separate tensor (``shard_id``) into its rows.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__()
        self.shard_offsets, offset = shard_offsets(shard_sizes)
        self.weight = nn.Parameter(torch.empty(offset, in_features))
        self.bias = nn.Parameter(torch.empty(offset)) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        start, size = self.shard_offsets[shard_id]
        if loaded.shape[0] != size:
            raise ValueError(f"shard {shard_id} has {loaded.shape[0]} rows, expected {size}")
        param.data[start : start + size].copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class GatedMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` with gate and up fused into one matmul.

    Under tensor parallelism each rank holds ``inter / tp`` of the gate and up rows (column-parallel)
    and the matching columns of ``down`` (row-parallel, summed over the tp group).
    """

    def __init__(self, hidden: int, inter: int, bias: bool = False) -> None:
        super().__init__()
        state = current()
        self.inter = inter // state.tp
        if state.tp == 1:
            self.gate_up_proj = MergedLinear(hidden, {"gate": inter, "up": inter}, bias=bias)
        else:
            shard = even_shard(inter, state.tp, state.tp_rank)
            self.gate_up_proj = ColumnParallelLinear(hidden, {"gate": shard, "up": shard}, bias=bias)
        self.down_proj = row_linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if cpu_kernels.enabled(gate_up) and gate_up.is_contiguous():
            return self.down_proj(cpu_kernels.silu_mul(gate_up, configured_threads()))
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)
