"""Our DeepSeek-V3 (MLA + group-limited MoE, YaRN rope) against transformers on the same random checkpoint.

Prefill logits and greedy tokens (alone, batched, from the prefix cache, and across a PREFILL ->
block copy -> DECODE hand-over), plus the point of MLA: the KV pool holds one latent row of
``kv_lora_rank + qk_rope_head_dim`` values per token per layer.
"""

from __future__ import annotations

import pytest

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import RequestMode
from tests.integration.fidelity_helpers import (
    PROMPTS,
    assert_greedy_alone_and_batched,
    encode_prompts,
    greedy,
    hf_greedy,
    load_hf,
    prefill_logits_diff,
    run_all,
    tokens,
)

pytestmark = pytest.mark.timeout(120)

BLOCK = 8
# The no-q-lora path, rotate-half (non-interleaved) rope, default rope, one expert group.
VARIANT = dict(q_lora_rank=None, rope_interleave=False, rope_scaling=None, n_group=1, topk_group=1)


@pytest.fixture(scope="module")
def tiny_dsv3(model_factory):
    return model_factory("deepseek_v3", "tiny")


@pytest.fixture(scope="module")
def hf_model(tiny_dsv3):
    return load_hf(tiny_dsv3)


@pytest.fixture(scope="module")
def prompt_ids(tiny_dsv3) -> list[list[int]]:
    return encode_prompts(tiny_dsv3)


@pytest.fixture(scope="module")
def expected(hf_model, prompt_ids) -> list[list[int]]:
    """HF's greedy continuation of every prompt."""
    return [hf_greedy(hf_model, ids) for ids in prompt_ids]


def make_engine(model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=model_dir, block_size=BLOCK, num_blocks=128))


@pytest.fixture(scope="module")
def engine(tiny_dsv3) -> LLMEngine:
    return make_engine(tiny_dsv3)


def test_prefill_logits_match_transformers(tiny_dsv3, hf_model, prompt_ids) -> None:
    assert prefill_logits_diff(tiny_dsv3, hf_model, prompt_ids) <= 1e-4


def test_variant_prefill_logits_match_transformers(model_factory, prompt_ids) -> None:
    model_dir = model_factory("deepseek_v3", "tiny", **VARIANT)
    assert prefill_logits_diff(model_dir, load_hf(model_dir), prompt_ids) <= 1e-4


def test_kv_pool_holds_one_latent_row_per_token_and_layer(engine) -> None:
    layout = engine.kv_layout
    width = 32 + 8  # kv_lora_rank + qk_rope_head_dim of the tiny preset
    assert layout.kind == "mla" and layout.num_kv_heads == 1 and layout.head_dim == width
    assert layout.block_shape == (3, BLOCK, width)
    assert engine.kv_pool.shape[1:] == layout.block_shape
    assert engine.kv_pool[0].numel() // BLOCK == width * 3


def test_greedy_tokens_match_transformers(engine, prompt_ids, expected) -> None:
    assert_greedy_alone_and_batched(engine, prompt_ids, expected)


def test_prefix_cache_hits_give_the_same_tokens(tiny_dsv3, prompt_ids, expected) -> None:
    engine = make_engine(tiny_dsv3)
    ids = prompt_ids[3]
    assert len(ids) > BLOCK
    engine.add_request(EngineRequest("first", ids, greedy()))
    outs = {"first": engine.step()}  # its prefill caches the prompt's full blocks
    engine.add_request(EngineRequest("again", ids, greedy()))  # decoded alongside "first"
    for rid, more in run_all(engine).items():
        outs.setdefault(rid, []).extend(more)
    assert tokens(outs["first"]) == tokens(outs["again"]) == expected[3]
    # the second prompt reuses every full block but the one holding its last token
    assert engine.stats().prefix_cache_hit_tokens == (len(ids) - 1) // BLOCK * BLOCK > 0


def test_prefill_decode_hand_over(engine, tiny_dsv3, prompt_ids, expected) -> None:
    decoder = make_engine(tiny_dsv3)
    decoder.allocate_kv(BLOCK * 5)  # so that the decoder's block ids differ from the prefiller's
    picked = (1, 3)
    for i in picked:  # prefilled together in one step
        engine.add_request(EngineRequest(f"r{i}", prompt_ids[i], greedy(), mode=RequestMode.PREFILL))
    prefilled = run_all(engine)
    for i in picked:
        (out,) = prefilled[f"r{i}"]
        dst = decoder.allocate_kv(len(prompt_ids[i]))
        decoder.kv_pool[dst] = engine.kv_pool[out.kv_block_ids]
        engine.free_kv(out.kv_block_ids)
        request = EngineRequest(f"r{i}", prompt_ids[i], greedy(), mode=RequestMode.DECODE)
        request.first_token, request.kv_block_ids = out.token_ids[0], dst
        decoder.add_request(request)
    decoded = run_all(decoder)  # decoded together
    for i in picked:
        assert tokens(prefilled[f"r{i}"] + decoded[f"r{i}"]) == expected[i], PROMPTS[i]
    assert engine.stats().free_blocks == engine.stats().total_blocks
