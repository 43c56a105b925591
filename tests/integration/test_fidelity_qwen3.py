"""Our Qwen3 against Hugging Face transformers on the same random checkpoint: logits and greedy tokens."""

from __future__ import annotations

import pytest

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from tests.integration.fidelity_helpers import (
    assert_greedy_alone_and_batched,
    encode_prompts,
    hf_greedy,
    load_hf,
    prefill_logits_diff,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def hf_model(tiny_qwen3):
    return load_hf(tiny_qwen3)


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3)


@pytest.fixture(scope="module")
def prompt_ids(tiny_qwen3) -> list[list[int]]:
    return encode_prompts(tiny_qwen3)


def test_prefill_logits_match_transformers(tiny_qwen3, hf_model, prompt_ids) -> None:
    assert prefill_logits_diff(tiny_qwen3, hf_model, prompt_ids) <= 1e-4


def test_greedy_tokens_match_transformers(tiny_qwen3, hf_model, prompt_ids) -> None:
    expected = [hf_greedy(hf_model, ids) for ids in prompt_ids]
    engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3))
    assert_greedy_alone_and_batched(engine, prompt_ids, expected)


def test_greedy_tokens_match_transformers_without_native_kernels(
    tiny_qwen3, hf_model, prompt_ids, monkeypatch: pytest.MonkeyPatch
) -> None:
    # where the CPU kernels cannot build, the models run PyTorch ops and oneDNN products instead
    from pdmesh.kernels import build

    monkeypatch.setenv(build.SWITCH, "0")
    build.load.cache_clear()
    try:
        engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3))
        assert not any(type(m.forward).__name__ == "_NativeForward" for m in engine.model.modules())
        expected = [hf_greedy(hf_model, ids) for ids in prompt_ids]
        assert_greedy_alone_and_batched(engine, prompt_ids, expected)
    finally:
        monkeypatch.delenv(build.SWITCH)
        build.load.cache_clear()


def test_greedy_tokens_match_transformers_with_a_head_dim_the_attention_kernels_do_not_take(
    model_factory, prompt_ids
) -> None:
    # head_dim 12 (not a multiple of 8): q/k norms and rope still run fused, attention in PyTorch
    model_dir = model_factory("qwen3", head_dim=12)
    hf = load_hf(model_dir)
    expected = [hf_greedy(hf, ids) for ids in prompt_ids]
    engine = LLMEngine(EngineConfig(model_dir=model_dir))
    assert_greedy_alone_and_batched(engine, prompt_ids, expected)
    assert prefill_logits_diff(model_dir, hf, prompt_ids) <= 1e-4


def test_tokenizer_and_chat_template(tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Will it rain?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWill it rain?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids


@pytest.mark.parametrize("kernel", ["pdmesh", "onednn", "torch"])
@pytest.mark.parametrize("workload", ["prefill", "mixed"])
def test_greedy_tokens_match_transformers_with_every_linear_product(
    tiny_qwen3, hf_model, prompt_ids, kernel: str, workload: str
) -> None:
    # a prefill worker may pick oneDNN on one host and pdmesh's kernel on another (linear_choice)
    engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3, workload=workload, linear_kernel=kernel))
    assert engine.runner.linear_kernel == kernel
    expected = [hf_greedy(hf_model, ids) for ids in prompt_ids]
    assert_greedy_alone_and_batched(engine, prompt_ids, expected)


def test_an_automatic_prefill_engine_picks_a_usable_product(tiny_qwen3, hf_model, prompt_ids) -> None:
    engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3, workload="prefill"))
    assert engine.runner.linear_kernel in ("pdmesh", "onednn", "torch")
    expected = [hf_greedy(hf_model, ids) for ids in prompt_ids]
    assert_greedy_alone_and_batched(engine, prompt_ids, expected)
