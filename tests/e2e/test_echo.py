"""Echo and prompt logprobs end to end (real processes, the official openai client) on a PD stack, where
the prefill worker computes them, and a mixed one, which answer the same: ``echo`` with ``logprobs``
and ``max_tokens: 0`` (how evaluation harnesses score a prompt), echo before a completion (streamed
too), vLLM's ``prompt_logprobs`` in chat, and gRPC Generate's, against transformers' log_softmax."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from openai import BadRequestError, OpenAI

from tests.e2e.conftest import start_stack

pytestmark = pytest.mark.timeout(300)

TOL = 1e-4
PROMPT = "The harbour lights came on one by one as the fishing boats returned"
MESSAGES = [{"role": "user", "content": "Tell me about the weather near the sea."}]


@pytest.fixture(scope="module")
def stacks(tiny_qwen3, tmp_path_factory) -> Iterator[dict]:
    started = {}
    try:
        for mode, decode in (("pd", 1), ("mixed", 0)):
            started[mode] = start_stack(tiny_qwen3, tmp_path_factory, prefill=1, decode=decode, mode=mode)
        yield started
    finally:
        for stack in started.values():
            stack.stop()


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    """transformers' tokenizer and float32 model for the same checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    return tokenizer, AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()


def hf_logprobs(model, ids: list[int]):
    """transformers' log_softmax at every position of ``ids``."""
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def client(stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def model_of(stack) -> str:
    return client(stack).models.list().data[0].id


def score(stack, **extra):
    return client(stack).completions.create(
        model=model_of(stack), prompt=PROMPT, echo=True, logprobs=1, max_tokens=0, temperature=0, **extra
    )


def test_echo_logprobs_without_generation_score_the_prompt(stacks, hf):
    tokenizer, model = hf
    ids = tokenizer.encode(PROMPT)
    lp = hf_logprobs(model, ids)
    answers = {mode: score(stack) for mode, stack in stacks.items()}
    for answer in answers.values():
        choice = answer.choices[0]
        assert choice.text == PROMPT and choice.finish_reason == "length"
        assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 0
        logprobs = choice.logprobs
        assert logprobs.tokens == [tokenizer.decode([t]) for t in ids]
        assert logprobs.text_offset == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        for pos, token in enumerate(ids[1:]):
            assert logprobs.token_logprobs[pos + 1] == pytest.approx(lp[pos, token].item(), abs=TOL)
            top = logprobs.top_logprobs[pos + 1]  # the prompt token, and the most likely one
            best = int(lp[pos].argmax())
            assert 1 <= len(top) <= 2 and top[tokenizer.decode([token])] == logprobs.token_logprobs[pos + 1]
            assert top[tokenizer.decode([best])] == pytest.approx(lp[pos, best].item(), abs=TOL)
        prompt_lps = choice.model_extra["prompt_logprobs"]  # vLLM's field: set by echo with logprobs
        assert prompt_lps[0] is None and len(prompt_lps) == len(ids)
        for pos, token in enumerate(ids[1:]):
            entry = prompt_lps[pos + 1][str(token)]
            assert entry["logprob"] == logprobs.token_logprobs[pos + 1]
            assert entry["rank"] == int((lp[pos] > lp[pos, token]).sum()) + 1
    pd, mixed = (answers[m].model_dump(exclude={"id", "created"}) for m in ("pd", "mixed"))
    assert pd == mixed


def test_echo_before_a_completion_streamed_and_not(stacks, hf):
    tokenizer, model = hf
    ids = tokenizer.encode(PROMPT)
    lp = hf_logprobs(model, ids)
    texts = {}
    for mode, stack in stacks.items():
        common = {"model": model_of(stack), "prompt": PROMPT, "echo": True, "max_tokens": 4, "temperature": 0}
        whole = client(stack).completions.create(logprobs=0, extra_body={"ignore_eos": True}, **common)
        choice = whole.choices[0]
        assert choice.text.startswith(PROMPT) and whole.usage.completion_tokens == 4
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(ids) + 4 and logprobs.token_logprobs[0] is None
        assert logprobs.token_logprobs[1] == pytest.approx(lp[0, ids[1]].item(), abs=TOL)
        assert logprobs.text_offset[len(ids)] == len(PROMPT)  # the completion's tokens after the prompt
        chunks = list(
            client(stack).completions.create(stream=True, extra_body={"ignore_eos": True}, **common)
        )
        assert chunks[0].choices[0].text.startswith(PROMPT)
        assert "".join(c.choices[0].text for c in chunks) == choice.text
        plain = client(stack).completions.create(extra_body={"ignore_eos": True}, **{**common, "echo": False})
        assert PROMPT + plain.choices[0].text == choice.text
        texts[mode] = choice.text
    assert texts["pd"] == texts["mixed"]


def test_chat_prompt_logprobs_extra(stacks, hf):
    tokenizer, model = hf
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    lp = hf_logprobs(model, ids)
    fields = {}
    for mode, stack in stacks.items():
        answer = client(stack).chat.completions.create(
            model=model_of(stack),
            messages=MESSAGES,
            max_tokens=2,
            temperature=0,
            extra_body={"prompt_logprobs": 2},
        )
        field = fields[mode] = answer.model_extra["prompt_logprobs"]
        assert field[0] is None and len(field) == len(ids)
        for pos, token in enumerate(ids[1:]):
            entry = field[pos + 1]
            assert entry[str(token)]["logprob"] == pytest.approx(lp[pos, token].item(), abs=TOL)
            assert entry[str(token)]["decoded_token"] == tokenizer.decode([token])
            values, best = lp[pos].topk(2)
            ranked = {e["rank"]: (int(t), e["logprob"]) for t, e in entry.items()}
            assert ranked[1][1] == pytest.approx(values[0].item(), abs=TOL)
            assert ranked[2][1] == pytest.approx(values[1].item(), abs=TOL)
            assert len(entry) <= 3
        with pytest.raises(BadRequestError, match="prompt_logprobs"):
            client(stack).chat.completions.create(
                model=model_of(stack), messages=MESSAGES, stream=True, extra_body={"prompt_logprobs": 1}
            )
    assert fields["pd"] == fields["mixed"]


def test_grpc_generate_returns_prompt_logprobs(stacks, hf):
    from pdmesh.rpc.client import open_channel
    from pdmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

    _, model = hf
    prompt = list(range(40, 60))
    lp = hf_logprobs(model, prompt)

    async def run(stack):
        async with open_channel(stack.coordinator_grpc) as channel:
            request = coordinator_pb2.GenerateRequest(
                prompt_ids=coordinator_pb2.TokenIds(ids=prompt),
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2),
            )
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            return [r async for r in stub.Generate(request, timeout=60)]

    for stack in stacks.values():
        replies = asyncio.run(run(stack))
        assert replies[0].HasField("prompt_logprobs")
        assert not any(r.HasField("prompt_logprobs") for r in replies[1:])
        tokens = replies[0].prompt_logprobs.tokens
        assert len(tokens) == len(prompt) - 1
        for pos, entry in enumerate(tokens):
            assert entry.logprob == pytest.approx(lp[pos, prompt[pos + 1]].item(), abs=TOL)
            assert entry.rank == int((lp[pos] > lp[pos, prompt[pos + 1]]).sum()) + 1
            assert [t.logprob for t in entry.top] == pytest.approx(lp[pos].topk(2).values.tolist(), abs=TOL)
