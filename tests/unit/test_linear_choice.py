"""The CPU linear product an engine picks for its workload (pdmesh.engine.linear_choice)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pdmesh.engine.linear_choice import LinearChoice, choose, projection_shapes, time_kernel

pytestmark = pytest.mark.timeout(60)


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64, bias=False)
        self.down = nn.Linear(64, 32, bias=False)
        self.again = nn.Linear(32, 64, bias=False)  # a shape already seen


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Layer(), _Layer()])
        self.lm_head = nn.Linear(32, 1000, bias=False)


def test_the_first_layers_distinct_projection_shapes_are_timed():
    shapes = sorted(tuple(w.shape) for w in projection_shapes(_Model()))
    assert shapes == [(32, 64), (64, 32)]


def test_decode_and_mixed_keep_the_first_usable_product_without_timing():
    model = _Model()
    assert choose(model, "decode", 512, ["pdmesh", "onednn", "torch"], 1) == ("pdmesh", {})
    assert choose(model, "mixed", 512, ["pdmesh", "torch"], 1) == ("pdmesh", {})


def test_a_prefill_engine_takes_the_fastest_product_it_timed():
    best, timings = choose(_Model(), "prefill", 64, ["torch", "onednn"], 1)
    assert set(timings) == {"torch", "onednn"} and best == min(timings, key=timings.get)
    assert all(t > 0 for t in timings.values())


def test_timing_runs_the_products_at_the_asked_rows():
    weights = [torch.randn(16, 8)]
    assert time_kernel("torch", weights, 4, 1) > 0


def test_an_explicit_product_that_cannot_run_is_refused_by_name():
    with pytest.raises(ValueError, match="linear_kernel 'pdmesh' cannot run here"):
        LinearChoice(kernel="pdmesh").resolve(_Model(), ["torch"], 1)
    assert LinearChoice(kernel="torch").resolve(_Model(), ["pdmesh", "torch"], 1) == "torch"
