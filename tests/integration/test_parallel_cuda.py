"""The nccl path of a parallel instance, wherever two CUDA GPUs are lent: tp 2 (and dp 2 + moe_ep 2
with the all_to_all dispatch) on two GPUs, one rank each, against transformers. Skipped, with the
reason, where fewer than two GPUs are present (NCCL refuses two ranks on one GPU)."""

from __future__ import annotations

import pytest
import torch

from tests.integration.parallel_helpers import Reference, run_probe

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]


def _needs_two_gpus() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        pytest.skip(f"needs two CUDA GPUs (one NCCL rank each); {count} here")


@pytest.mark.parametrize(
    ("arch", "worker"),
    [("qwen3", dict(tp=2)), ("qwen3_moe", dict(dp=2, moe_ep=2, moe_dispatch="all_to_all"))],
    ids=["qwen3-tp2", "qwen3_moe-dp2-ep2-a2a"],
)
def test_nccl_ranks_match_transformers(model_factory, arch, worker) -> None:
    _needs_two_gpus()
    reference = Reference(model_factory(arch, "tiny"))
    report = run_probe(reference.model_dir, reference.prompts, device="cuda", **worker)
    for i, ref in enumerate(reference.logits):
        assert (torch.tensor(report["logits"][i]) - ref).abs().max().item() <= 1e-3  # GPU float32 sums
    assert report["alone"] == reference.tokens
    assert report["batched"] == reference.tokens
