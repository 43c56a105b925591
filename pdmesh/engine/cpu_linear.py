"""Faster projections on CPU: weights packed once at load, products by a native kernel or oneDNN.

``F.linear`` on CPU hands ``x @ W.T`` to MKL, which on the 2-core AVX2 bench machine (an AMD EPYC)
reaches about 40 GFLOP/s for the 32000x512 LM head at 32 rows and 80 for the layer projections.
Two faster products, both over a weight packed once at load:

- pdmesh's own AVX2 kernel (``pdmesh.kernels.cpu.linear``, a 4x24 register block over weights
  packed in panels of 24 output columns), where the CPU kernels built. Measured against oneDNN on
  the AVX2-only bench host over the bench model's 33 products of one decode step (weights cold, as
  in a real step): 15-20% less time at 32 rows, about 30% less at one row, even at 4096 rows;
- oneDNN's inner product over a weight reordered into its blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``, the path PyTorch's own CPU inference compiler
  uses), about 100 GFLOP/s for both, 2x MKL for the LM head of a single sequence.

Either differs from ``F.linear`` only by float rounding (summation order). oneDNN's ops are
private (``torch.ops.mkldnn``) and fail on some builds (e.g. aarch64, as on Ascend hosts): before
packing for oneDNN, one small product is tried against ``F.linear``, and where it raises or differs,
the linears keep ``F.linear`` (the reason logged) instead of failing the load.

Which of the two an engine packs for is ``linear_choice``'s decision (per host and workload: a
prefill worker times them). ``pack_linears`` switches a loaded float32 model's plain ``nn.Linear``
and ``MergedLinear`` modules to that packed product, and a tensor-parallel ``ShardedLinear``'s local product (its collective
stays around it). The dense weight is then released (the packed copy replaces it, so the
model does not take twice its memory) unless other code still reads it: a tied weight (shared with
the embedding) or a module that sets ``keep_dense_weight``. Without either product, or for other
dtypes, the modules stay as they are.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pdmesh.engine import linear_choice
from pdmesh.engine.linear_choice import PACK_BATCH_HINT
from pdmesh.kernels import cpu as cpu_kernels
from pdmesh.models.layers import MergedLinear
from pdmesh.models.parallel_layers import ShardedLinear
from pdmesh.models.threads import all_threads, configured_threads

logger = logging.getLogger(__name__)


def packing_available(dtype: torch.dtype) -> bool:
    """True when this torch has oneDNN's packed linear for ``dtype`` on CPU (float32 only)."""
    return (
        dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def onednn_works() -> bool:
    """Whether oneDNN's packed product runs here and agrees with ``F.linear`` (a small probe)."""
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(24, 16, generator=generator), torch.randn(3, 16, generator=generator)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except RuntimeError as exc:  # NotImplementedError included: an op this build cannot run
        logger.warning("oneDNN's packed linear fails on this host (%s); linears keep F.linear", exc)
        return False
    if not torch.allclose(out, torch.nn.functional.linear(x, weight), rtol=1e-4, atol=1e-4):
        logger.warning("oneDNN's packed linear disagrees with F.linear on this host; linears keep F.linear")
        return False
    return True


class _NativeForward:
    """A module's forward over its weight packed for pdmesh's CPU kernel."""

    def __init__(self, packed: cpu_kernels.PackedLinear) -> None:
        self.packed = packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear(x, self.packed, configured_threads())


class _PackedForward:
    """A module's forward over its packed weight (set as the module instance's ``forward``)."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> None:
        self.packed = packed
        self.bias = bias
        self.out_features = out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if not rows.is_contiguous():
            rows = rows.contiguous()
        with all_threads():
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def _shared_weights(model: nn.Module) -> set[int]:
    """Storage pointers of parameters reachable under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        ptr = param.untyped_storage().data_ptr()
        seen[ptr] = seen.get(ptr, 0) + 1
    return {ptr for ptr, count in seen.items() if count > 1}


def usable_kernels(model: nn.Module) -> list[str]:
    """The products that can run this model's linears here, pdmesh's kernel first (``linear_choice``);
    empty when the model is not on the CPU."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return []
    return linear_choice.available_kernels(first, lambda: packing_available(first.dtype) and onednn_works())


def pack_linears(model: nn.Module, kernel: str | None = None) -> int:
    """Switches the model's plain linears to the packed product ``kernel`` (``pdmesh`` or ``onednn``;
    None: the first usable, see ``usable_kernels``); returns how many. ``torch`` leaves them as they are.

    Subclasses of ``nn.Linear`` (which may compute something else) are left alone, as is every
    module when packing is not available for the model's dtype.
    """
    if kernel is None:
        kernel = (usable_kernels(model) or ["torch"])[0]
    if kernel == "torch":
        return 0
    native = kernel == "pdmesh"
    shared = _shared_weights(model)
    count = 0
    for module in model.modules():
        sharded = isinstance(module, ShardedLinear)
        if type(module) not in (nn.Linear, MergedLinear) and not sharded:
            continue
        weight = module.weight.detach()
        bias = module.bias.detach() if module.bias is not None else None
        if sharded and not module.bias_in_product:
            bias = None  # a row-parallel bias is added once, after the sum over ranks
        if native:
            module.packed_linear = cpu_kernels.pack_linear(weight, bias)  # also read by fused_decode
            product = _NativeForward(module.packed_linear)
        else:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
            product = _PackedForward(packed, bias, weight.shape[0])
        if sharded:  # only the local product: the module still runs its collective around it
            module.product = product
        else:
            module.forward = product
        module.packed_weight_nbytes = weight.numel() * weight.element_size()
        keep = getattr(module, "keep_dense_weight", False)
        if not keep and weight.untyped_storage().data_ptr() not in shared:
            module.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
        count += 1
    logger.info("packed %d linear weights for %s", count, "pdmesh's CPU kernel" if native else "oneDNN")
    return count
