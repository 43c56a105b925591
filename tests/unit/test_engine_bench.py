"""``pdmesh bench engine`` output fields (not speed), and chunked prefill against unchunked."""

from __future__ import annotations

import json
import random

import pytest
import torch

from pdmesh.bench.engine import main
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import SamplingParams
from pdmesh.kernels import build

pytestmark = pytest.mark.timeout(120)

FIELDS = [
    "engine_output_tokens_per_s",
    "hf_output_tokens_per_s",
    "ratio",
    "batch_size",
    "input_len",
    "output_len",
    "device",
    "dtype",
    "bytes_per_decode_step",
    "achieved_gbytes_per_s",
    "memcpy_gbytes_per_s",
    "roofline_tokens_per_s",
]


def test_bench_json_fields(tiny_qwen3, capsys) -> None:
    argv = ["--model", str(tiny_qwen3), "--batch-size", "2", "--input-len", "8", "--output-len", "4"]
    assert main([*argv, "--reference", "hf", "--json", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    for name in FIELDS:
        assert name in report, name
    assert (report["batch_size"], report["input_len"], report["output_len"]) == (2, 8, 4)
    assert (report["device"], report["dtype"]) == ("cpu", "float32")
    assert report["engine_output_tokens_per_s"] > 0 and report["hf_output_tokens_per_s"] > 0
    assert report["ratio"] > 0 and report["roofline_tokens_per_s"] > 0
    assert report["greedy_sequences_equal_to_hf"] == "2/2"
    assert report["repeats"] == 1 and len(report["ratio_runs"]) == 1
    assert report["cpu_kernels"] == (build.load() is not None)
    assert set(report["cpu"]["flags"]) >= {"avx2", "avx512f", "amx_tile"}  # the host it ran on


def test_bench_repeats_report_medians_and_every_pair(tiny_qwen3, capsys) -> None:
    argv = ["--model", str(tiny_qwen3), "--batch-size", "1", "--input-len", "4", "--output-len", "2"]
    assert main([*argv, "--reference", "hf", "--json", "--threads", "1", "--repeats", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["repeats"] == 3 and len(report["ratio_runs"]) == 3
    assert report["ratio"] == sorted(report["ratio_runs"])[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch-size", "0", "--input-len", "8", "--output-len", "4"],
        ["--batch-size", "2", "--input-len", "8", "--output-len", "4", "--dtype", "int8"],
        ["--batch-size", "2", "--input-len", "8"],
        ["--batch-size", "2", "--input-len", "8", "--output-len", "4", "--device", "tpu"],
        ["--batch-size", "2", "--input-len", "8", "--output-len", "4", "--repeats", "0"],
    ],
)
def test_bench_bad_flags_one_line_exit_2(tiny_qwen3, capsys, argv) -> None:
    with pytest.raises(SystemExit) as exc:
        code = main(["--model", str(tiny_qwen3), *argv])
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err


def _prefill_logits(model_dir, prompt: list[int], **kw) -> tuple[torch.Tensor, list[int], int]:
    """The last prefill step's logits, the greedy tokens and the number of prefill steps."""
    engine = LLMEngine(EngineConfig(model_dir=model_dir, enable_prefix_caching=False, **kw))
    captured: list[torch.Tensor] = []
    run = engine.runner.run

    def recording(seqs, is_prefill, logits=True):
        out = run(seqs, is_prefill, logits=logits)
        if is_prefill:
            captured.append(out)
        return out

    engine.runner.run = recording
    engine.add_request(
        EngineRequest("r", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    )
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.token_ids]
    assert captured[-1] is not None and all(c is None for c in captured[:-1])
    return captured[-1], tokens, len(captured)


def test_chunked_prefill_matches_unchunked(tiny_qwen3) -> None:
    rng = random.Random(7)
    prompt = [rng.randrange(3, 1000) for _ in range(70)]
    whole, want, steps = _prefill_logits(tiny_qwen3, prompt)
    chunked, got, chunks = _prefill_logits(tiny_qwen3, prompt, max_prefill_tokens=16, block_size=8)
    assert steps == 1 and chunks == 5  # 16 + 16 + 16 + 16 + 6
    assert (whole - chunked).abs().max().item() <= 1e-4
    assert got == want


def test_chunked_prompt_with_others_waiting(tiny_qwen3) -> None:
    rng = random.Random(8)
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in (40, 5, 33, 9)]
    sampling = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def run(**kw) -> dict[str, list[int]]:
        engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3, **kw))
        for i, p in enumerate(prompts):
            engine.add_request(EngineRequest(f"r{i}", p, sampling))
        got: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.token_ids)
        assert engine.stats().free_blocks == engine.stats().total_blocks
        return got

    assert run(max_prefill_tokens=12) == run()
