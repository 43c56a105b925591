"""Prompt logprobs from the engine against transformers' float32 log_softmax on a random Qwen3
checkpoint: alone, batched with prompts that do not ask, in chunks (and slices of rows), over a
prefix-cache hit, and in PREFILL mode (what a prefill worker runs)."""

from __future__ import annotations

import pytest
import torch

from pdmesh.engine import prompt_logprobs
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import RequestMode, SamplingParams
from tests.integration.fidelity_helpers import encode_prompts, load_hf, run_all

pytestmark = pytest.mark.timeout(120)

TOL = 1e-4
TOP = 3


@pytest.fixture(scope="module")
def hf_model(tiny_qwen3):
    return load_hf(tiny_qwen3)


@pytest.fixture(scope="module")
def prompts(tiny_qwen3) -> list[list[int]]:
    return encode_prompts(tiny_qwen3)


def sampling(prompt_logprobs: int | None = TOP, max_tokens: int = 2) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=prompt_logprobs
    )


def assert_match_transformers(hf_model, ids: list[int], entries: list, top: int = TOP) -> None:
    """Each entry equals transformers' log_softmax at the position before its token (within TOL)."""
    with torch.inference_mode():
        lp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert len(entries) == len(ids) and entries[0] is None
    for pos, entry in enumerate(entries[1:]):
        logprob, rank, alternatives = entry
        row, token = lp[pos], ids[pos + 1]
        assert logprob == pytest.approx(row[token].item(), abs=TOL)
        assert int((row > row[token] + TOL).sum()) + 1 <= rank <= int((row >= row[token] - TOL).sum())
        values, top_ids = row.topk(top)
        assert list(alternatives.values()) == pytest.approx(values.tolist(), abs=TOL)
        assert len(alternatives) == top and max(alternatives.values()) >= logprob - TOL
        assert set(alternatives) == set(top_ids.tolist()) or len(set(values.tolist())) < top


def first_outputs(engine: LLMEngine) -> dict:
    return {rid: outs[0] for rid, outs in run_all(engine).items()}


def test_prompt_logprobs_alone_and_batched(tiny_qwen3, hf_model, prompts) -> None:
    engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3))
    engine.add_request(EngineRequest("solo", prompts[1], sampling()))
    solo = first_outputs(engine)["solo"]
    assert_match_transformers(hf_model, prompts[1], solo.prompt_logprobs)
    for i, ids in enumerate(prompts):  # mixed: every other one asks, the others project one row
        engine.add_request(EngineRequest(f"b{i}", ids, sampling(TOP if i % 2 == 0 else None)))
    got = run_all(engine)
    for i, ids in enumerate(prompts):
        outs = got[f"b{i}"]
        assert all(o.prompt_logprobs is None for o in outs[1:])  # only with the first token
        if i % 2:
            assert outs[0].prompt_logprobs is None
        else:
            assert_match_transformers(hf_model, ids, outs[0].prompt_logprobs)
    assert engine.stats().free_blocks == engine.stats().total_blocks


def test_prompt_logprobs_in_chunks_and_over_a_cached_prefix(
    tiny_qwen3, hf_model, prompts, monkeypatch
) -> None:
    monkeypatch.setattr(prompt_logprobs, "SLICE_ROWS", 5)  # each chunk's rows in several slices
    ids = prompts[3] + prompts[1]  # longer than two blocks of 16 and three chunks of 13
    engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3, max_prefill_tokens=13))
    engine.add_request(EngineRequest("warm", ids, sampling(None)))  # fills the prefix cache
    run_all(engine)
    assert len(ids) > 2 * 16 + 13 and engine.stats().prefix_cache_hit_tokens == 0
    engine.add_request(EngineRequest("chunked", ids, sampling()))
    out = first_outputs(engine)["chunked"]
    assert engine.stats().prefix_cache_hit_tokens == 0  # computed whole: every position has logits
    assert_match_transformers(hf_model, ids, out.prompt_logprobs)
    assert out.token_ids == run_greedy(engine, ids)  # the first token is the one without prompt logprobs


def run_greedy(engine: LLMEngine, ids: list[int]) -> list[int]:
    engine.add_request(EngineRequest("plain", ids, sampling(None, max_tokens=1)))
    tokens = first_outputs(engine)["plain"].token_ids
    assert engine.stats().prefix_cache_hit_tokens > 0  # a prompt without prompt logprobs does hit
    return tokens


def test_prefill_mode_carries_them_and_zero_means_the_tokens_own(tiny_qwen3, hf_model, prompts) -> None:
    engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3))
    request = EngineRequest("p", prompts[0], sampling(0), mode=RequestMode.PREFILL)
    engine.add_request(request)
    out = first_outputs(engine)["p"]
    assert out.kv_block_ids and len(out.prompt_logprobs) == len(prompts[0])
    assert all(top == {} for _, _, top in out.prompt_logprobs[1:])
    full = EngineRequest("q", prompts[0], sampling())
    engine.add_request(full)
    expected = first_outputs(engine)["q"].prompt_logprobs
    assert [e[:2] for e in out.prompt_logprobs[1:]] == [e[:2] for e in expected[1:]]
    engine.free_kv(out.kv_block_ids)
    one = EngineRequest("one", prompts[2][:1], sampling())
    engine.add_request(one)
    assert first_outputs(engine)["one"].prompt_logprobs == [None]
