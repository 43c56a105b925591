"""Parallel instances compute what transformers computes: real ranks (processes over gloo), random
checkpoints with 8 routed experts, float32 prefill logits within 1e-4 and equal greedy tokens.

Dense families at tp 2 (and Qwen2 at tp 4: two KV heads replicated over four ranks, biased q/k/v);
Qwen3-MoE and DeepSeek-V3 (MLA, whose latent cache is whole on every tp rank) at tp 2, moe_ep 2,
dp 2 + moe_ep 2, tp 2 + moe_tp 2, through each dispatch path. Each prompt alone leaves the other dp
replica idle: it must still join every MoE collective (with an empty batch) or the step hangs.
"""

from __future__ import annotations

import pytest

from tests.integration.parallel_helpers import Reference, assert_matches

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def reference(model_factory, request) -> Reference:
    arch = request.param
    return Reference(model_factory(arch, "tiny"))


@pytest.mark.parametrize(
    ("reference", "worker"),
    [
        ("qwen3", dict(tp=2)),
        ("qwen2", dict(tp=4)),
        ("llama", dict(dp=2)),
    ],
    indirect=["reference"],
    ids=["qwen3-tp2", "qwen2-tp4", "llama-dp2"],
)
def test_dense(reference, worker) -> None:
    assert_matches(reference, **worker)


MOE_CASES = [
    dict(tp=2),  # moe_tp 2 by default, all_reduce
    dict(tp=2, moe_ep=2, moe_tp=1),  # all_reduce over experts split in two
    dict(dp=2, moe_ep=2),  # all_gather + reduce_scatter
    dict(dp=2, moe_ep=2, moe_dispatch="all_to_all"),
    dict(tp=2, moe_tp=2, moe_ep=1, moe_dispatch="all_gather"),
    dict(tp=2, dp=2, moe_ep=2, moe_tp=2, moe_dispatch="all_to_all"),  # 4 ranks: every kind of group
]
MOE_IDS = ["tp2", "tp2-ep2", "dp2-ep2-gather", "dp2-ep2-a2a", "tp2-moetp2-gather", "tp2-dp2-ep2-moetp2-a2a"]


@pytest.mark.parametrize("reference", ["qwen3_moe"], indirect=True)
@pytest.mark.parametrize("worker", MOE_CASES, ids=MOE_IDS)
def test_qwen3_moe(reference, worker) -> None:
    assert_matches(reference, **worker)


@pytest.mark.parametrize("reference", ["deepseek_v3"], indirect=True)
@pytest.mark.parametrize(
    "worker", [MOE_CASES[0], MOE_CASES[2], MOE_CASES[3], MOE_CASES[5]], ids=[MOE_IDS[i] for i in (0, 2, 3, 5)]
)
def test_deepseek_v3(reference, worker) -> None:
    assert_matches(reference, **worker)
