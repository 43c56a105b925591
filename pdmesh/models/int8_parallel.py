"""The row-parallel W8A8 INT8 linear (o_proj, down_proj at tp > 1): input columns split over tp.

Each rank keeps ``W_q[:, K_r]`` (its columns) and the whole per-output-channel scales: a column
slice of a row still belongs to that row's channel. The product is the single-rank one, split:

- dynamic: a token's scale is the max ``|x|`` over its whole row, so the ranks first take the max
  of their shards' maxima (one small all-reduce of ``[M, 1]``), then quantize their shard with it;
- both schemes: each rank's int32 partial sums are summed over the tp group *before* dequantizing
  (an all-reduce of int32, as many bytes as the float one). Integer sums are exact, so the result
  is bit-identical to tp 1's;
- static: msModelSlim's ``quant_bias`` (int32, the input offset's correction and the folded float
  bias) is added once: tp rank 0 keeps it, the other ranks hold zeros;
- a float bias (dynamic, compressed-tensors) is added once, after the sum.

On Ascend ``npu_quant_matmul`` dequantizes inside the product, so there each rank's dequantized
output is summed (float) and a dynamic scheme quantizes each shard with its own per-token scale,
as vllm-ascend does; the results equal tp 1's up to that quantization and float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from pdmesh import accelerator
from pdmesh.models.int8 import PARAMS, _Int8Params, quantize_rows, quantize_static
from pdmesh.models.parallel_layers import even_shard
from pdmesh.parallel import comm
from pdmesh.parallel.state import current


class Int8RowLinear(_Int8Params):
    """A row-parallel projection with an int8 weight: this rank's ``[N, K / tp]`` columns."""

    def __init__(
        self, in_features: int, out_features: int, family: str, scheme: str, bias: nn.Parameter | None
    ) -> None:
        super().__init__()
        state = current()
        shard = even_shard(in_features, state.tp, state.tp_rank)
        self.first, self.in_local, self.in_features = shard.first, shard.rows, in_features
        self.out_features = out_features
        self.adds_quant_bias = state.tp_rank == 0
        self._make((), out_features, shard.rows, family, scheme, bias)

    def shard_rows_after(self, start: int) -> int:
        return self.out_features - start

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        name = self._name_of(param)
        if name == "weight":
            if tuple(loaded.shape) != (self.out_features, self.in_features):
                raise ValueError(
                    f"row-parallel int8 weight of shape {tuple(loaded.shape)}, expected "
                    f"{(self.out_features, self.in_features)}"
                )
            loaded = loaded[:, self.first : self.first + self.in_local]
        elif name == "quant_bias" and not self.adds_quant_bias:
            loaded = torch.zeros_like(loaded)  # the sum over the tp group adds rank 0's once
        self._put(param, loaded, (), 0)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        # no bias: it is added once, after the sum
        return {n: getattr(self, n, None) for n in ("weight", *PARAMS[("msmodelslim", "static")])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = row_parallel_product(rows, self.tensors(), self.scheme)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def row_parallel_product(x: torch.Tensor, p: dict[str, torch.Tensor | None], scheme: str) -> torch.Tensor:
    """``x [M, K / tp]`` through this rank's columns, summed over the tp group: float32 ``[M, N]``."""
    weight = p["weight"]
    if x.device.type == "npu":
        return comm.all_reduce_tp(accelerator.npu_w8a8(x, weight, p, scheme).float())
    if scheme == "dynamic":
        x_q, scale = quantize_rows(x, amax=comm.max_over_tp)
        return comm.all_reduce_tp(accelerator.int_mm(x_q, weight.t())).float() * (scale * p["weight_scale"])
    x_q = quantize_static(x, p["input_scale"], p["input_offset"])
    acc = accelerator.int_mm(x_q, weight.t()) + p["quant_bias"]
    return comm.all_reduce_tp(acc).float() * p["deq_scale"]
