"""W8A8 INT8 checkpoints on instances of several ranks (real ranks over gloo), against the same
checkpoint on one rank.

The int8 weights and their scales are sharded as the float ones (column-parallel rows with their
per-row scales, row-parallel columns with the scales whole, static ``quant_bias`` added once, the
int32 partial sums added before dequantizing), so the int8 products equal the single rank's bit for
bit; what may differ is the order of float additions elsewhere (measured: 0, and 1e-6 when dp 2
sums the experts' outputs in another order). Stated tolerance: prefill logits within 1e-5 of the
largest logit; greedy tokens identical (alone and batched). Qwen3 at tp 2 (static and dynamic
activations); Qwen3-MoE with its experts over moe_ep 2 (with tp 2 or dp 2), with redundant experts
and an online rebalance that moves the int8 weights and their scales between the ranks; DeepSeek-V3
(MLA) at tp 2 + moe_ep 2. Experts split over moe_tp ranks are refused by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest
from pdmesh.models import load_model
from pdmesh.models.int8 import _Int8Params
from pdmesh.parallel import state as parallel_state
from pdmesh.parallel.layout import ModelDims, build_layout
from pdmesh.quantize import quantize_checkpoint
from tests.integration.fidelity_helpers import greedy, prefill_logits, run_all, tokens
from tests.integration.parallel_helpers import NEW_TOKENS, run_probe

pytestmark = pytest.mark.timeout(600)

PROMPT_IDS = [[5, 17, 300, 42, 7, 99], [1000, 3, 3, 3, 250, 11, 12, 13, 14, 15, 16, 900, 2], [77]]
LOGITS_RTOL = 1e-5


class SingleRank:
    """The int8 checkpoint on one rank: prefill logits of every prompt and greedy tokens."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        model, _ = load_model(model_dir)
        assert any(isinstance(m, _Int8Params) for m in model.modules())
        self.logits = [prefill_logits(model, ids) for ids in PROMPT_IDS]
        engine = LLMEngine(EngineConfig(model_dir=model_dir))
        for i, ids in enumerate(PROMPT_IDS):
            engine.add_request(EngineRequest(f"r{i}", ids, greedy(NEW_TOKENS)))
        got = run_all(engine)
        self.tokens = [tokens(got[f"r{i}"]) for i in range(len(PROMPT_IDS))]

    def assert_logits(self, got: list, what: str) -> None:
        for i, ref in enumerate(self.logits):
            diff = (torch.tensor(got[i]) - ref).abs().max().item()
            assert diff <= LOGITS_RTOL * ref.abs().max().item(), (
                f"prompt {i} {what}: logits differ by {diff:.2e}"
            )


@pytest.fixture(scope="module")
def single_rank(model_factory, tmp_path_factory):
    cache: dict[tuple[str, str], SingleRank] = {}

    def make(arch: str, fmt: str) -> SingleRank:
        if (arch, fmt) not in cache:
            out = tmp_path_factory.mktemp(f"{arch}-{fmt}")
            quantize_checkpoint(
                model_factory(arch, "tiny"), out, fmt.removesuffix("-static"), fmt.endswith("-static")
            )
            cache[(arch, fmt)] = SingleRank(out)
        return cache[(arch, fmt)]

    return make


def _assert_same(ref: SingleRank, report: dict, worker: dict) -> None:
    ref.assert_logits(report["logits"], f"with {worker}")
    assert report["alone"] == ref.tokens, worker
    assert report["batched"] == ref.tokens, worker
    free, total = report["blocks"]
    assert free == total
    assert report["comm_calls"] > 0


@pytest.mark.parametrize("fmt", ["msmodelslim-w8a8", "compressed-tensors"])  # static; dynamic per token
def test_qwen3_tp2_equals_one_rank(fmt: str, single_rank) -> None:
    ref = single_rank("qwen3", fmt)
    worker = dict(tp=2)
    _assert_same(ref, run_probe(ref.model_dir, PROMPT_IDS, **worker), worker)


@pytest.mark.parametrize(
    ("fmt", "worker"),
    [
        ("msmodelslim-w8a8-dynamic", dict(tp=2, moe_ep=2, moe_tp=1, num_redundant_experts=2)),
        (
            "compressed-tensors-static",
            dict(dp=2, moe_ep=2, num_redundant_experts=2, moe_dispatch="all_to_all"),
        ),
    ],
    ids=["tp2-ep2-r2-dynamic", "dp2-ep2-r2-a2a-static"],
)
def test_qwen3_moe_ep2_with_rebalance_equals_one_rank(fmt: str, worker: dict, single_rank) -> None:
    ref = single_rank("qwen3_moe", fmt)
    report = run_probe(ref.model_dir, PROMPT_IDS, rebalance=True, **worker)
    _assert_same(ref, report, worker)
    assert report["placement_after"] != report["placement_before"]  # int8 weights and scales moved
    assert report["eplb"]["imbalance_after"] <= report["eplb"]["imbalance_before"]
    ref.assert_logits(report["after_logits"], "after the rebalance")
    assert report["after_batched"] == ref.tokens


def test_deepseek_v3_tp2_ep2_equals_one_rank(single_rank) -> None:
    ref = single_rank("deepseek_v3", "msmodelslim-w8a8")  # MLA's head projections column-parallel
    worker = dict(tp=2, moe_ep=2, moe_tp=1)
    _assert_same(ref, run_probe(ref.model_dir, PROMPT_IDS, **worker), worker)


def test_int8_experts_split_over_moe_tp_are_refused(model_factory, tmp_path) -> None:
    quantize_checkpoint(model_factory("qwen3_moe", "tiny"), tmp_path, "compressed-tensors")
    layout = build_layout(2, 2, 1, 1, 2, ModelDims(4, 2, 8, 128, 32))
    parallel_state.install(parallel_state.ParallelState(layout, 0))
    try:
        with pytest.raises(ValueError, match="moe_tp=1"):
            load_model(tmp_path)
    finally:
        parallel_state.reset()
