"""W8A8 INT8 linears: int8 weights kept in memory, activations quantized at run time, int32 products.

Two activation schemes, both with symmetric per-output-channel int8 weights ``W_q [N, K]``:

- dynamic (msModelSlim ``W8A8_DYNAMIC``, compressed-tensors ``dynamic: true, strategy: token``):
  each token's row is scaled by ``s_t = max|x_t| / 127``, ``x_q = round(x / s_t)``, and
  ``y = (x_q @ W_q.T) * s_t * weight_scale + bias``;
- static (msModelSlim ``W8A8``, compressed-tensors ``dynamic: false, strategy: tensor``): one
  calibrated ``input_scale`` and ``input_offset`` for the whole input, ``x_q = round(x / input_scale
  + input_offset)``, and ``y = (x_q @ W_q.T + quant_bias) * deq_scale (+ bias)`` where msModelSlim's
  ``quant_bias`` folds the offset's correction (``-input_offset * sum_k W_q``) and the float bias,
  and ``deq_scale = input_scale * weight_scale``.

The integer product is ``accelerator.int_mm`` (``torch._int_mm``, exact int32 accumulation) on CPU
and CUDA; on Ascend, ``accelerator.npu_w8a8`` runs torch_npu's fused quantize and
``npu_quant_matmul``. ``Int8Linear`` replaces a dense linear (plain or merged q/k/v, gate/up);
``Int8StackedExperts`` replaces the MoE experts' stacked weights. Their parameters carry the
checkpoint's tensor names, so the loader fills them like any other; ``finalize`` then derives the
run-time tensors (``int8_formats`` picks which parameters each format has).

On several ranks the int8 weights and their scales are sharded as the float ones are:
``Int8Linear`` keeps its column-parallel rows (``ColumnShard``) of the weight, of every per-row
scale and of the bias; ``Int8RowLinear`` (``int8_parallel``) the row-parallel columns;
``Int8StackedExperts`` the experts its ep rank holds, in their slots (replicas included).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pdmesh import accelerator
from pdmesh.models.layers import shard_offsets
from pdmesh.models.parallel_layers import ColumnShard

QMIN, QMAX = -128, 127
# the parameters of each (format family, scheme): per output row ("rows") or one value ("tensor")
ROW, TENSOR = "rows", "tensor"
PARAMS: dict[tuple[str, str], dict[str, str]] = {
    ("msmodelslim", "static"): {
        "input_scale": TENSOR,
        "input_offset": TENSOR,
        "quant_bias": ROW,
        "deq_scale": ROW,
        "weight_scale": ROW,
        "weight_offset": ROW,
    },
    ("msmodelslim", "dynamic"): {"weight_scale": ROW, "weight_offset": ROW},
    ("compressed-tensors", "static"): {"weight_scale": ROW, "input_scale": TENSOR},
    ("compressed-tensors", "dynamic"): {"weight_scale": ROW},
}
_INT_PARAMS = {"quant_bias": torch.int32}


def quantize_rows(
    x: torch.Tensor, amax: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(x_q [M, K] int8, scale [M, 1] float32)`` with ``x ~ x_q * scale``.

    ``amax`` may replace each row's max ``|x|`` (a row-parallel shard: the max over all ranks)."""
    xf = x.float()
    row_max = xf.abs().amax(dim=-1, keepdim=True)
    if amax is not None:
        row_max = amax(row_max)
    scale = row_max.clamp(min=1e-10) / QMAX
    return torch.round(xf / scale).clamp(QMIN, QMAX).to(torch.int8), scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``round(x / scale + offset)`` clamped to int8 (one scale and offset for the whole tensor)."""
    return torch.round(x.float() / scale + offset).clamp(QMIN, QMAX).to(torch.int8)


def _deq_scale_values(loaded: torch.Tensor) -> torch.Tensor:
    """msModelSlim stores ``deq_scale`` as float32, or (float16 models) as int64 holding the float32's bits."""
    if loaded.dtype == torch.int64:
        return loaded.to(torch.int32).view(torch.float32)
    return loaded.float()


class _Int8Params(nn.Module):
    """The checkpoint-named parameters of one quantized weight ``[*lead, rows, cols]`` and its scales.

    Subclasses say how many rows a shard starting at a row has (``shard_rows_after``).
    """

    sharded = True  # the loader hands every tensor to ``weight_loader`` (scales need reshaping)

    def _make(self, lead: tuple[int, ...], rows: int, cols: int, family: str, scheme: str, bias) -> None:
        self.family, self.scheme = family, scheme
        self.weight = nn.Parameter(torch.zeros(*lead, rows, cols, dtype=torch.int8), requires_grad=False)
        self.param_kinds = PARAMS[(family, scheme)]
        for name, kind in self.param_kinds.items():
            shape = (*lead, rows) if kind == ROW else (*lead, 1)
            dtype = _INT_PARAMS.get(name, torch.float32)
            setattr(self, name, nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False))
        self.bias = bias
        self._tensor_seen: set[tuple[str, int]] = set()

    def _name_of(self, param: nn.Parameter) -> str:
        return next(n for n, p in self._parameters.items() if p is param)

    def _put(self, param: nn.Parameter, loaded: torch.Tensor, lead: tuple[int, ...], start: int) -> None:
        name = self._name_of(param)
        target = param.data[lead] if lead else param.data
        if name == "weight":
            if loaded.dtype != torch.int8:
                raise ValueError(f"quantized weight has dtype {loaded.dtype}, expected int8")
            if loaded.shape[1] != target.shape[1] or start + loaded.shape[0] > target.shape[0]:
                raise ValueError(
                    f"int8 weight of shape {tuple(loaded.shape)} does not fit {tuple(target.shape)}"
                )
            target[start : start + loaded.shape[0]].copy_(loaded)
            return
        if name == "bias":
            target[start : start + loaded.shape[0]].copy_(loaded)
            return
        values = _deq_scale_values(loaded) if name == "deq_scale" else loaded
        values = values.reshape(-1).to(target.dtype)
        if self.param_kinds[name] == TENSOR:
            self._put_tensor_value(name, target, values, lead)
            return
        if values.numel() == 1:  # a per-tensor weight scale (compressed-tensors "tensor"): every row
            values = values.expand(self.shard_rows_after(start))
        target[start : start + values.numel()].copy_(values)

    def _put_tensor_value(self, name: str, target: torch.Tensor, values: torch.Tensor, lead) -> None:
        if values.numel() != 1:
            raise ValueError(f"{name} must hold one value (per tensor), got {values.numel()}")
        key = (name, lead[0] if lead else -1)
        if key in self._tensor_seen and not torch.equal(target, values):
            # q/k/v (gate/up) read the same input, so calibration gives them the same scale
            raise ValueError(
                f"the projections fused here have different {name}s ({target.item()} vs {values.item()})"
            )
        self._tensor_seen.add(key)
        target.copy_(values)

    def finalize(self) -> None:
        """Checks symmetric weights and derives the run-time tensors from the loaded ones."""
        offset = getattr(self, "weight_offset", None)
        if offset is not None and bool(offset.detach().ne(0).any()):
            raise ValueError("asymmetric int8 weights (non-zero weight_offset) are not supported")
        if self.scheme == "dynamic":
            return
        if self.family == "compressed-tensors":  # symmetric static: no offset, no integer bias
            self.input_offset = nn.Parameter(torch.zeros_like(self.input_scale), requires_grad=False)
            self.deq_scale = nn.Parameter(self.input_scale * self.weight_scale, requires_grad=False)
            self.quant_bias = nn.Parameter(
                torch.zeros_like(self.weight_scale, dtype=torch.int32), requires_grad=False
            )


def int8_product(x: torch.Tensor, p: dict[str, torch.Tensor | None], scheme: str) -> torch.Tensor:
    """``x [M, K]`` through one quantized weight: ``p`` holds weight [N, K] int8 and its scales."""
    weight, bias = p["weight"], p.get("bias")
    if x.device.type == "npu":
        return accelerator.npu_w8a8(x, weight, p, scheme)
    if scheme == "dynamic":
        x_q, scale = quantize_rows(x)
        y = accelerator.int_mm(x_q, weight.t()).float() * (scale * p["weight_scale"])
    else:
        x_q = quantize_static(x, p["input_scale"], p["input_offset"])
        y = (accelerator.int_mm(x_q, weight.t()) + p["quant_bias"]).float() * p["deq_scale"]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class Int8Linear(_Int8Params):
    """A dense projection (or several fused, by ``shard_offsets``) with an int8 weight ``[N, K]``.

    ``shards`` gives each projection's rows: a count (all of them), or the ``ColumnShard`` of the
    checkpoint's rows a column-parallel rank keeps (the same rows of its per-row scales and bias).
    """

    def __init__(
        self,
        in_features: int,
        shards: dict[str, int | ColumnShard],
        family: str,
        scheme: str,
        bias: nn.Parameter | None,
    ) -> None:
        super().__init__()
        self.shards = {
            name: s if isinstance(s, ColumnShard) else ColumnShard(s, 0, s) for name, s in shards.items()
        }
        self.shard_offsets, offset = shard_offsets({n: s.rows for n, s in self.shards.items()})
        self.in_features, self.out_features = in_features, offset
        self._make((), offset, in_features, family, scheme, bias)

    def shard_rows_after(self, start: int) -> int:
        return next(size for first, size in self.shard_offsets.values() if first == start)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        name = shard_id if shard_id is not None else next(iter(self.shards))
        self._put(param, self._kept_rows(param, loaded, name), (), self.shard_offsets[name][0])

    def _kept_rows(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> torch.Tensor:
        """This rank's rows of a checkpoint tensor of projection ``name`` (per-tensor values whole)."""
        shard = self.shards[name]
        kind = self.param_kinds.get(self._name_of(param), ROW)
        if kind == TENSOR or loaded.numel() == 1 or shard.rows == shard.full:
            return loaded
        if loaded.shape[0] != shard.full:
            raise ValueError(f"shard {name} has {loaded.shape[0]} rows, expected {shard.full}")
        return loaded[shard.first : shard.first + shard.rows]

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {n: getattr(self, n, None) for n in ("weight", "bias", *PARAMS[("msmodelslim", "static")])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return int8_product(rows, self.tensors(), self.scheme).view(*x.shape[:-1], self.out_features)


class Int8StackedExperts(_Int8Params):
    """The MoE experts' stacked weights ``[E, rows, cols]`` in int8, each expert with its own scales.

    Under expert parallelism ``slot_of`` (as ``StackedExpertWeight``'s) maps a global expert to
    this rank's slots: the weight and every scale go to each replica's slot, or nowhere."""

    def __init__(
        self,
        num_experts: int,
        rows: int,
        cols: int,
        shard_rows: dict[str, int],
        family: str,
        scheme: str,
        slot_of: Callable[[int], int | list[int] | None] | None = None,
    ) -> None:
        super().__init__()
        self.shard_rows = shard_rows
        self.slot_of = slot_of or (lambda expert: expert)
        self._make((num_experts,), rows, cols, family, scheme, None)

    def shard_rows_after(self, start: int) -> int:
        ends = sorted([*self.shard_rows.values(), self.weight.shape[1]])
        return next(e for e in ends if e > start) - start

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        expert, name = shard_id.split(":")
        slots = self.slot_of(int(expert))
        if slots is None or slots == []:
            return  # an expert another ep rank holds
        for slot in slots if isinstance(slots, list) else [slots]:
            self._put(param, loaded, (slot,), self.shard_rows[name])

    def product(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """``x [M, cols]`` through expert ``slot``'s weight."""
        p = {n: (t[slot] if t is not None else None) for n, t in self._expert_tensors().items()}
        return int8_product(x, p, self.scheme)

    def _expert_tensors(self) -> dict[str, torch.Tensor | None]:
        return {n: getattr(self, n, None) for n in ("weight", *PARAMS[("msmodelslim", "static")])}
