"""Helpers shared by the fidelity tests: our model/engine against transformers on one checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import SamplingParams, TokenOutput
from pdmesh.models import AttentionMetadata, load_model

NEW_TOKENS = 32
PROMPTS = [
    "The network is",
    "Salt is the most important seasoning in the kitchen, and",
    "Clouds",
    "A router reads the destination of each packet, looks it up in a table, and then the weather",
]


def load_hf(model_dir: Path, dtype: torch.dtype = torch.float32):
    """transformers' model for ``model_dir``, set to generate exactly ``max_new_tokens``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # 32 tokens whatever comes out
    return model


def encode_prompts(model_dir: Path) -> list[list[int]]:
    """``PROMPTS`` through the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer.encode(p) for p in PROMPTS]


def hf_greedy(hf_model, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    """transformers' greedy continuation of ``ids``."""
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def greedy(n: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def run_all(engine: LLMEngine) -> dict[str, list[TokenOutput]]:
    """Steps ``engine`` until idle; every request's outputs."""
    outs: dict[str, list[TokenOutput]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def tokens(outs: list[TokenOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def assert_greedy_alone_and_batched(
    engine: LLMEngine, prompt_ids: list[list[int]], expected: list[list[int]]
) -> None:
    """The engine's greedy tokens equal ``expected`` for one prompt alone, then for every prompt
    (mixed lengths) run concurrently; afterwards every block is free."""
    engine.add_request(EngineRequest("solo", prompt_ids[0], greedy()))
    assert tokens(run_all(engine)["solo"]) == expected[0]
    for i, ids in enumerate(prompt_ids):
        engine.add_request(EngineRequest(f"b{i}", ids, greedy()))
    got = run_all(engine)
    for i in range(len(prompt_ids)):
        assert tokens(got[f"b{i}"]) == expected[i], PROMPTS[i]
    assert engine.stats().free_blocks == engine.stats().total_blocks


def prefill_logits(model, ids: list[int], block: int = 16) -> torch.Tensor:
    """Our logits for every position of ``ids`` prefilled alone into a fresh KV pool (no engine)."""
    dtype = next(model.parameters()).dtype
    n = len(ids)
    num_blocks = -(-n // block)
    model.bind_kv_cache(torch.zeros((num_blocks, *model.kv_block_shape(block)), dtype=dtype))
    slots = torch.arange(n)
    table = torch.arange(num_blocks)[None, :]
    meta = AttentionMetadata(True, slots // block, slots % block, table, [n], [n])
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), meta))


def prefill_logits_diff(model_dir: Path, hf_model, prompt_ids: list[list[int]]) -> float:
    """Max |ours - HF| over the float32 prefill logits of every prompt."""
    model, _ = load_model(model_dir, "float32", "cpu")
    worst = 0.0
    for ids in prompt_ids:
        with torch.inference_mode():
            ref = hf_model(torch.tensor([ids])).logits[0]
        worst = max(worst, (prefill_logits(model, ids) - ref).abs().max().item())
    return worst
