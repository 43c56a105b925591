"""Llama (3.1 rope), Qwen2 and Qwen3-MoE against Hugging Face transformers on random checkpoints.

For each family: the checkpoint is a real HF one (``AutoModelForCausalLM`` picks the right class),
float32 prefill logits agree to 1e-4, and the engine's greedy tokens equal HF ``generate``'s alone,
in a concurrent batch of mixed-length prompts and when served from the prefix cache. A variant
per family covers the config switches the tiny preset leaves off. bfloat16 loads and generates.
"""

from __future__ import annotations

import json

import pytest
import torch

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest
from pdmesh.models import load_model
from tests.integration.fidelity_helpers import (
    assert_greedy_alone_and_batched,
    encode_prompts,
    greedy,
    hf_greedy,
    load_hf,
    prefill_logits,
    prefill_logits_diff,
    run_all,
    tokens,
)

pytestmark = pytest.mark.timeout(120)

TOLERANCE = 1e-4  # max |ours - HF| of float32 logits, every family
BLOCK = 8
HF_NAMES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
# What the tiny presets leave off: Llama without rope scaling but with q/k/v/o and MLP biases and
# tied embeddings; Qwen2 with tied embeddings; Qwen3-MoE without top-k renormalisation and with
# every second layer sparse (decoder_sparse_step=2, no mlp_only_layers).
VARIANTS = {
    "llama": dict(rope_scaling=None, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3_moe": dict(norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=()),
}


@pytest.fixture(scope="module", params=sorted(HF_NAMES))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(model_factory, arch):
    return model_factory(arch, "tiny")


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return load_hf(model_dir)


@pytest.fixture(scope="module")
def prompt_ids(model_dir) -> list[list[int]]:
    return encode_prompts(model_dir)


@pytest.fixture(scope="module")
def expected(hf_model, prompt_ids) -> list[list[int]]:
    """HF's greedy continuation of every prompt."""
    return [hf_greedy(hf_model, ids) for ids in prompt_ids]


def make_engine(model_dir, dtype: str = "float32") -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=model_dir, dtype=dtype, block_size=BLOCK, num_blocks=64))


def test_checkpoint_is_the_family_in_hf_layout(arch, model_dir, hf_model) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    model_type, hf_class = HF_NAMES[arch]
    assert (config["model_type"], config["architectures"]) == (model_type, [hf_class])
    assert type(hf_model).__name__ == hf_class
    assert (model_dir / "tokenizer.json").exists() and (model_dir / "generation_config.json").exists()


def test_prefill_logits_match_transformers(model_dir, hf_model, prompt_ids) -> None:
    assert prefill_logits_diff(model_dir, hf_model, prompt_ids) <= TOLERANCE


def test_variant_prefill_logits_match_transformers(model_factory, arch, prompt_ids) -> None:
    variant_dir = model_factory(arch, "tiny", **VARIANTS[arch])
    assert prefill_logits_diff(variant_dir, load_hf(variant_dir), prompt_ids) <= TOLERANCE


def test_greedy_tokens_match_transformers(model_dir, prompt_ids, expected) -> None:
    engine = make_engine(model_dir)
    assert_greedy_alone_and_batched(engine, prompt_ids, expected)


def test_prefix_cache_hits_give_the_same_tokens(model_dir, prompt_ids, expected) -> None:
    engine = make_engine(model_dir)
    ids = prompt_ids[3]
    assert len(ids) > BLOCK
    engine.add_request(EngineRequest("first", ids, greedy()))
    assert tokens(run_all(engine)["first"]) == expected[3]
    engine.add_request(EngineRequest("again", ids, greedy()))
    assert tokens(run_all(engine)["again"]) == expected[3]
    assert engine.stats().prefix_cache_hit_tokens > 0


def test_bfloat16_loads_and_generates(model_dir, prompt_ids) -> None:
    model, _ = load_model(model_dir, "bfloat16", "cpu")
    logits = prefill_logits(model, prompt_ids[1], BLOCK)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    engine = make_engine(model_dir, "bfloat16")
    engine.add_request(EngineRequest("bf16", prompt_ids[1], greedy(8)))
    assert len(tokens(run_all(engine)["bf16"])) == 8
