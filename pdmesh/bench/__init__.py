"""Benchmarks of a running deployment: ``pdmesh bench serve`` loads any OpenAI-compatible endpoint.

``run_benchmark(BenchConfig(...))`` is the programmatic entry (other tools, such as a PD-versus-
colocated comparison, call it); ``pdmesh.bench.serve.main(argv)`` is the command line. The names
below are imported lazily so that ``python -m pdmesh.bench.serve`` does not import its module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BenchConfig": "pdmesh.bench.serve",
    "BenchResult": "pdmesh.bench.serve",
    "run_benchmark": "pdmesh.bench.serve",
    "main": "pdmesh.bench.serve",
    "BenchMetrics": "pdmesh.bench.metrics",
    "RequestOutput": "pdmesh.bench.metrics",
    "compute_metrics": "pdmesh.bench.metrics",
    "parse_goodput": "pdmesh.bench.metrics",
    "SampleRequest": "pdmesh.bench.datasets",
    "load_dataset": "pdmesh.bench.datasets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
