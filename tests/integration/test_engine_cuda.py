"""The engine on a CUDA GPU, checked wherever one is present: the same greedy tokens as on the CPU
for a small float32 checkpoint (single and batched), and ``pdmesh bench engine --device cuda``
against transformers on the same GPU. Skipped, with the reason, where there is no CUDA GPU."""

from __future__ import annotations

import json

import pytest
import torch

from pdmesh.bench.engine import main as bench_main
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

PROMPTS = [[5, 17, 42, 7, 99, 3], [11, 12], [300 + i for i in range(40)], [1, 2, 3, 4, 5, 6, 7, 8, 9]]


def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none here")


def _greedy_tokens(model_dir, device: str) -> dict[str, list[int]]:
    engine = LLMEngine(EngineConfig(model_dir=model_dir, device=device, num_blocks=128))
    for i, ids in enumerate(PROMPTS):
        sampling = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        engine.add_request(EngineRequest(f"r{i}", ids, sampling))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return tokens


def test_cuda_gives_the_cpu_greedy_tokens(tiny_qwen3) -> None:
    _needs_cuda()
    assert _greedy_tokens(tiny_qwen3, "cuda") == _greedy_tokens(tiny_qwen3, "cpu")


def test_bench_engine_on_cuda_against_transformers(tiny_qwen3, capsys) -> None:
    _needs_cuda()
    argv = ["--model", str(tiny_qwen3), "--device", "cuda", "--batch-size", "8"]
    argv += ["--input-len", "32", "--output-len", "16", "--reference", "hf", "--json"]
    assert bench_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"].startswith("cuda")
    assert report["engine_output_tokens_per_s"] > 0 and report["hf_output_tokens_per_s"] > 0
    assert report["ratio"] == pytest.approx(
        report["engine_output_tokens_per_s"] / report["hf_output_tokens_per_s"], rel=1e-6
    )
