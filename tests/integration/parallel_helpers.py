"""Runs ``parallel_probe`` (a real parallel instance: this test's child is rank 0 and starts the other
ranks as processes of their own, over gloo) and compares what it computed with transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.integration.fidelity_helpers import encode_prompts, hf_greedy, load_hf

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 16
PROBE_TIMEOUT_S = 240  # a few ranks loading torch and a tiny model on a loaded 2-core machine


class Reference:
    """transformers' float32 logits and greedy tokens for every test prompt of one checkpoint."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.prompts = encode_prompts(model_dir)
        hf = load_hf(model_dir)
        with torch.inference_mode():
            self.logits = [hf(torch.tensor([ids])).logits[0] for ids in self.prompts]
        self.tokens = [hf_greedy(hf, ids, NEW_TOKENS) for ids in self.prompts]


def run_probe(model_dir: Path, prompts: list[list[int]], rebalance: bool = False, **worker) -> dict:
    """The probe's report for ``prompts`` on an instance with these ``WorkerConfig`` settings."""
    spec = {"model": str(model_dir), "prompts": prompts, "new_tokens": NEW_TOKENS, "worker": worker}
    spec["rebalance"] = rebalance
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.parallel_probe", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, f"probe failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_matches(reference: Reference, rebalance: bool = False, **worker) -> dict:
    """The instance's prefill logits within 1e-4 of transformers', its greedy tokens equal (each
    prompt alone, then all batched), its prompt logprobs within 1e-4 of transformers' log_softmax,
    and every block free afterwards."""
    report = run_probe(reference.model_dir, reference.prompts, rebalance, **worker)
    for i, ref in enumerate(reference.logits):
        got = torch.tensor(report["logits"][i])
        assert got.shape == ref.shape
        diff = (got - ref).abs().max().item()
        assert diff <= 1e-4, f"prompt {i}: logits differ by {diff:.2e} with {worker}"
    assert report["alone"] == reference.tokens, worker
    assert report["batched"] == reference.tokens, worker
    for ids, ref, got in zip(reference.prompts, reference.logits, report["prompt_logprobs"], strict=True):
        lp = torch.log_softmax(ref.float(), dim=-1)  # prompt logprobs: position p predicts token p + 1
        expected = [None, *(lp[p, t].item() for p, t in enumerate(ids[1:]))]
        assert got[0] is None and torch.allclose(torch.tensor(got[1:]), torch.tensor(expected[1:]), atol=1e-4)
    free, total = report["blocks"]
    assert free == total
    assert report["comm_calls"] > 0  # the ranks did talk
    if "moe_dispatch" in worker:
        assert report["dispatch"] == worker["moe_dispatch"]
    return report
