"""Our Qwen3 against Hugging Face transformers on the same random checkpoint: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest, SamplingParams
from pdmesh.models import AttentionMetadata, load_model

pytestmark = pytest.mark.timeout(120)

NEW_TOKENS = 32
PROMPTS = [
    "The network is",
    "Salt is the most important seasoning in the kitchen, and",
    "Clouds",
    "A router reads the destination of each packet, looks it up in a table, and then the weather",
]


@pytest.fixture(scope="module")
def hf_model(tiny_qwen3):
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # 32 tokens whatever comes out
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p) for p in PROMPTS]


def hf_greedy(hf_model, ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_prefill_logits_match_transformers(tiny_qwen3, hf_model, prompt_ids) -> None:
    model, cfg = load_model(tiny_qwen3, "float32", "cpu")
    block = 16
    pool = torch.zeros((16, cfg.num_layers, 2, block, cfg.num_kv_heads, cfg.head_dim))
    model.bind_kv_cache(pool)
    for ids in prompt_ids:
        n = len(ids)
        slots = torch.arange(n)
        table = torch.arange(-(-n // block))[None, :]
        meta = AttentionMetadata(True, slots // block, slots % block, table, [n], [n])
        with torch.inference_mode():
            ours = model.compute_logits(model(torch.tensor(ids), torch.arange(n), meta))
            ref = hf_model(torch.tensor([ids])).logits[0]
        assert (ours - ref).abs().max().item() <= 1e-4


def test_greedy_tokens_match_transformers(tiny_qwen3, hf_model, prompt_ids) -> None:
    expected = [hf_greedy(hf_model, ids) for ids in prompt_ids]
    engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3))
    sampling = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    # one sequence alone
    engine.add_request(EngineRequest("solo", prompt_ids[0], sampling))
    solo: list[int] = []
    while engine.has_unfinished():
        solo += [t for o in engine.step() for t in o.token_ids]
    assert solo == expected[0]
    # a batch of prompts of different lengths, run concurrently
    for i, ids in enumerate(prompt_ids):
        engine.add_request(EngineRequest(f"b{i}", ids, sampling))
    got: dict[str, list[int]] = {f"b{i}": [] for i in range(len(prompt_ids))}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.token_ids
    for i in range(len(prompt_ids)):
        assert got[f"b{i}"] == expected[i], PROMPTS[i]
    assert engine.stats().free_blocks == engine.stats().total_blocks


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
