"""W8A8 INT8 checkpoints (``pdmesh quantize`` of random qwen3, qwen3_moe, deepseek_v3) in every format.

Our int8 model against a float64 numpy reference of the same arithmetic (``tests/int8_reference.py``
put in place of the int8 product): greedy tokens identical, prefill logits within 1e-4 of the
largest logit. Against the float model the difference is the quantization's own error, bounded
here at 0.3 of the largest logit (tiny random models, measured 0.01-0.27). Weights stay int8:
a quarter of float32's bytes, plus at most four float32 scales per output row.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest
from pdmesh.models import int8 as int8_module
from pdmesh.models import load_model
from pdmesh.models.int8 import _Int8Params
from pdmesh.quantize import quantize_checkpoint
from tests.int8_reference import reference_int8_product
from tests.integration.fidelity_helpers import (
    assert_greedy_alone_and_batched,
    greedy,
    prefill_logits,
    run_all,
    tokens,
)

pytestmark = pytest.mark.timeout(240)

ARCHS = ("qwen3", "qwen3_moe", "deepseek_v3")
FORMATS = ("msmodelslim-w8a8", "msmodelslim-w8a8-dynamic", "compressed-tensors", "compressed-tensors-static")
PROMPT_IDS = [[5, 17, 300, 42, 7, 99], [1000, 3, 3, 3, 250, 11, 12, 13, 14, 15, 16, 900, 2], [77]]
REFERENCE_RTOL = 1e-4
QUANTIZATION_RTOL = 0.3


@pytest.fixture(scope="module")
def quantized(model_factory, tmp_path_factory):
    cache: dict[tuple[str, str], Path] = {}

    def make(arch: str, fmt: str) -> Path:
        if (arch, fmt) not in cache:
            out = tmp_path_factory.mktemp(f"{arch}-{fmt}")
            base, static = fmt.removesuffix("-static"), fmt.endswith("-static")
            quantize_checkpoint(model_factory(arch, "tiny"), out, base, static=static)
            cache[(arch, fmt)] = out
        return cache[(arch, fmt)]

    return make


def _reference_tokens(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    with monkeypatch.context() as patch:
        patch.setattr(int8_module, "int8_product", reference_int8_product)
        engine = LLMEngine(EngineConfig(model_dir=model_dir))
        for i, ids in enumerate(PROMPT_IDS):
            engine.add_request(EngineRequest(f"r{i}", ids, greedy()))
        got = run_all(engine)
    return [tokens(got[f"r{i}"]) for i in range(len(PROMPT_IDS))]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_int8_logits_match_float64_reference(
    arch: str, fmt: str, quantized, model_factory, monkeypatch
) -> None:
    model, _ = load_model(quantized(arch, fmt))
    float_model, _ = load_model(model_factory(arch, "tiny"))
    for ids in PROMPT_IDS:
        got = prefill_logits(model, ids)
        with monkeypatch.context() as patch:
            patch.setattr(int8_module, "int8_product", reference_int8_product)
            ref = prefill_logits(model, ids)
        scale = ref.abs().max().item()
        assert (got - ref).abs().max().item() <= REFERENCE_RTOL * scale
        assert (got - prefill_logits(float_model, ids)).abs().max().item() <= QUANTIZATION_RTOL * scale


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_int8_greedy_tokens_match_float64_reference(arch: str, fmt: str, quantized, monkeypatch) -> None:
    model_dir = quantized(arch, fmt)
    expected = _reference_tokens(model_dir, monkeypatch)
    engine = LLMEngine(EngineConfig(model_dir=model_dir))
    assert_greedy_alone_and_batched(engine, PROMPT_IDS, expected)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_int8_weights_take_a_quarter_of_float32(arch: str, fmt: str, quantized, model_factory) -> None:
    model, _ = load_model(quantized(arch, fmt))
    float_model, _ = load_model(model_factory(arch, "tiny"))
    modules = [(path, m) for path, m in model.named_modules() if isinstance(m, _Int8Params)]
    assert modules, "no weight was loaded as int8"
    for path, m in modules:
        dense = float_model.get_submodule(path).weight
        assert dense.dtype == torch.float32 and m.weight.dtype == torch.int8
        assert m.weight.nbytes * 4 == dense.nbytes, path
        rows = m.weight.numel() // m.weight.shape[-1]
        scales = sum(p.nbytes for name, p in m.named_parameters() if name not in ("weight", "bias"))
        groups = m.weight[..., 0, 0].numel()  # experts, or one
        # at most four float32 per output row, and an input scale and offset per weight
        assert scales <= 4 * (4 * rows + 2 * groups), path
