"""Which product the CPU linears use on this host, for this engine's work, chosen at load by measuring.

Three products can run a float32 linear on CPU (``cpu_linear``): pdmesh's own AVX2 kernel over
panel-packed weights, oneDNN's inner product over a weight reordered into its blocked layout, and
plain ``F.linear`` (MKL). Which one is fastest depends on the host (AVX2 only, AVX-512, AMX) and on
the rows per product: a decode step multiplies a few to a few dozen rows, a prefill hundreds to
thousands. Measured on an AVX2-only EPYC, pdmesh's kernel won at every row count; on an AVX-512 one
(no AMX) the two are within a few percent at prefill sizes on quiet cores, and pdmesh's kernel slows
down several times more when other processes share the cores (docs/benchmarks.md). Only one
packed copy of each weight is kept (two would double the model's memory), so the engine picks the
product for the rows it will mostly run:

- ``decode`` (a decode worker): pdmesh's kernel where it builds, since its decode path is also the
  fused one-call-per-layer step (``fused_decode``) that needs its packing;
- ``prefill`` (a prefill worker): the fastest of the available products at prefill rows
  (``min(max_prefill_tokens, PREFILL_ROWS)``), timed on one decoder layer's projection shapes with
  the engine's threads;
- ``mixed``: pdmesh's kernel where it builds (decode latency comes first for a colocated worker).

``EngineConfig.linear_kernel`` overrides the choice (``pdmesh``, ``onednn``, ``torch``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdmesh.kernels import cpu as cpu_kernels

log = logging.getLogger(__name__)

# rows oneDNN's weight reorder is tuned for; any row count works (a decode batch is typical)
PACK_BATCH_HINT = 32
PREFILL_ROWS = 512  # rows timed for a prefill worker (fewer when its prefill budget is smaller)
TIMED_RUNS = 3  # the best of these per product and shape (a shared host is noisy)


@dataclass(frozen=True)
class LinearChoice:
    """What the engine asks for: its ``workload``, the ``kernel`` (``auto``: measured here) and its
    prefill token budget (bounds the rows timed for a prefill worker)."""

    workload: str = "mixed"
    kernel: str = "auto"
    prefill_tokens: int = PREFILL_ROWS

    def resolve(self, model: nn.Module, usable: list[str], threads: int) -> str:
        """The product to pack with; ValueError when an explicitly asked one cannot run here."""
        if self.kernel != "auto":
            if self.kernel not in usable:
                raise ValueError(
                    f"linear_kernel {self.kernel!r} cannot run here (usable: {', '.join(usable) or 'none'})"
                )
            return self.kernel
        return choose(model, self.workload, self.prefill_tokens, usable, threads)[0]


def available_kernels(sample: torch.Tensor, onednn_ok: Callable[[], bool]) -> list[str]:
    """The products that can run here for a model like ``sample`` (one of its parameters);
    ``onednn_ok`` says whether oneDNN's packed product runs for its dtype."""
    kernels = []
    if cpu_kernels.enabled(sample):
        kernels.append("pdmesh")
    if onednn_ok():
        kernels.append("onednn")
    kernels.append("torch")
    return kernels


def projection_shapes(model: nn.Module) -> list[torch.Tensor]:
    """The weights of the first decoder layer's projections (each distinct shape once)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    scope = layers[0] if layers is not None and len(layers) else model
    weights: dict[tuple[int, int], torch.Tensor] = {}
    for module in scope.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and weight is not None and weight.dim() == 2 and weight.numel():
            weights.setdefault(tuple(weight.shape), weight.detach())
    return list(weights.values())


def _product(kernel: str, weight: torch.Tensor, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    if kernel == "pdmesh":
        packed = cpu_kernels.pack_linear(weight)
        return lambda x: cpu_kernels.linear(x, packed, threads)
    if kernel == "onednn":
        reordered = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, reordered, None, "none", [], "")
    return lambda x: F.linear(x, weight)


def time_kernel(kernel: str, weights: list[torch.Tensor], rows: int, threads: int) -> float:
    """Seconds for one product of ``rows`` rows through every weight (the best of ``TIMED_RUNS``)."""
    products = [(_product(kernel, w, threads), torch.randn(rows, w.shape[1])) for w in weights]
    best = float("inf")
    for _ in range(TIMED_RUNS + 1):  # the first run warms caches and oneDNN's primitive cache
        start = time.perf_counter()
        for product, x in products:
            product(x)
        best = min(best, time.perf_counter() - start)
    return best


def choose(
    model: nn.Module, workload: str, prefill_tokens: int, kernels: list[str], threads: int
) -> tuple[str, dict[str, float]]:
    """The product for ``workload`` (``prefill``, ``decode`` or ``mixed``) among ``kernels``, and
    the seconds each one measured (empty when nothing was timed)."""
    if workload != "prefill" or len(kernels) == 1:
        return kernels[0], {}
    rows = max(1, min(prefill_tokens, PREFILL_ROWS))
    weights = projection_shapes(model)
    if not weights:
        return kernels[0], {}
    timings = {k: time_kernel(k, weights, rows, threads) for k in kernels}
    best = min(timings, key=timings.get)
    log.info(
        "linear product for %s at %d rows: %s (%s)",
        workload,
        rows,
        best,
        ", ".join(f"{k} {1e3 * s:.2f} ms" for k, s in timings.items()),
    )
    return best, timings
