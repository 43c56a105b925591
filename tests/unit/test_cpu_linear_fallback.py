"""Where oneDNN's private packing ops fail (as on aarch64 builds of torch, e.g. Ascend hosts) and the
native kernels are off, the engine loads with plain ``F.linear`` and generates the same tokens."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from pdmesh.engine import cpu_linear
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import SamplingParams
from pdmesh.kernels import build

pytestmark = pytest.mark.timeout(120)


def greedy_tokens(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    sampling = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", ids, sampling))
    tokens: dict[str, list[int]] = {}
    for _ in range(1000):
        if not engine.has_unfinished():
            return [tokens[f"r{i}"] for i in range(len(prompts))]
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    raise AssertionError("the engine did not finish")


def _unsupported(*args, **kwargs):
    raise RuntimeError("mkldnn linear weight reorder is not supported on this platform")


def test_a_failing_packing_op_is_detected_and_named(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", _unsupported)
    with caplog.at_level(logging.WARNING, logger=cpu_linear.__name__):
        assert not cpu_linear.onednn_works()
    assert "not supported on this platform" in caplog.text and "keep F.linear" in caplog.text


def test_the_engine_falls_back_to_f_linear(tiny_qwen3, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    rng = random.Random(7)
    prompts = [[rng.randrange(0, 1000) for _ in range(n)] for n in (5, 17, 40)]
    expected = greedy_tokens(LLMEngine(EngineConfig(model_dir=tiny_qwen3)), prompts)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", _unsupported)
    monkeypatch.setenv(build.SWITCH, "0")  # the native kernels off, so oneDNN would pack the products
    build.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_linear.__name__):
            engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3))
        assert "keep F.linear" in caplog.text
        assert not any(hasattr(m, "packed_weight_nbytes") for m in engine.model.modules())
        assert greedy_tokens(engine, prompts) == expected
    finally:
        build.load.cache_clear()
