"""EPLB on a real expert-parallel instance (2 ranks over gloo, random Qwen3-MoE with 8 experts):
with redundant experts, and after an online rebalance that moves expert weights between the ranks,
the logits stay within 1e-4 of transformers and the greedy tokens equal its tokens."""

from __future__ import annotations

import pytest
import torch

from tests.integration.parallel_helpers import Reference, assert_matches

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def reference(model_factory) -> Reference:
    return Reference(model_factory("qwen3_moe", "tiny"))


@pytest.mark.parametrize(
    "worker",
    [
        dict(tp=2, moe_ep=2, moe_tp=1, num_redundant_experts=2),  # all_reduce
        dict(dp=2, moe_ep=2, num_redundant_experts=2, moe_dispatch="all_to_all"),
        # and every 3 steps while requests run (prefill chunks and decode steps in between)
        dict(tp=2, moe_ep=2, moe_tp=1, num_redundant_experts=2, eplb_interval_steps=3),
    ],
    ids=["tp2-ep2-r2", "dp2-ep2-r2-a2a", "tp2-ep2-r2-periodic"],
)
def test_redundant_experts_and_online_rebalance(reference, worker) -> None:
    report = assert_matches(reference, rebalance=True, **worker)
    if "eplb_interval_steps" not in worker:  # else the periodic ones may have balanced it already
        assert report["placement_after"] != report["placement_before"]  # weights did move
    for layer in report["placement_after"]:
        assert sum(len(row) for row in layer) == 8 + 2
    assert report["eplb"]["imbalance_after"] <= report["eplb"]["imbalance_before"]
    assert report["after_batched"] == reference.tokens
    for i, ref in enumerate(reference.logits):
        diff = (torch.tensor(report["after_logits"][i]) - ref).abs().max().item()
        assert diff <= 1e-4, f"prompt {i} after the rebalance: logits differ by {diff:.2e}"
    # the counts: every MoE layer saw the same (token, expert) pairs, top-2 of each token
    totals = [sum(layer["total"]) for layer in report["expert_stats"]]
    assert totals[0] > 0 and totals[0] % 2 == 0 and len(set(totals)) == 1
    for layer in report["expert_stats"]:
        assert sum(layer["rank_loads"]) == pytest.approx(sum(layer["window"]))
