"""Logprobs end to end (real processes): through PD (first token from the prefill worker, the rest
from the decode worker), through a decode worker that prefills a short prompt itself, over HTTP
(chat and completions, whole and streamed) and gRPC, against transformers' log_softmax."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import start_stack
from tests.e2e.helpers import list_instances, stream_chat

pytestmark = pytest.mark.timeout(240)

MESSAGES = [{"role": "user", "content": "Tell me about the weather near the sea."}]
LOCAL_PREFILL_BELOW = 8  # prompts shorter than this are prefilled by the decode worker
MAX_TOKENS = 8
TOL = 1e-4


@pytest.fixture(scope="module")
def stack(tiny_qwen3, tmp_path_factory) -> Iterator:
    stack = start_stack(
        tiny_qwen3,
        tmp_path_factory,
        prefill=1,
        decode=1,
        coordinator_args={"local-prefill-threshold": str(LOCAL_PREFILL_BELOW)},
        controller_args={"heartbeat-interval-s": "0.2"},
    )
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    """transformers' tokenizer and float32 model for the same checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    return tokenizer, AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()


def hf_steps(model, ids: list[int], n: int = MAX_TOKENS) -> list:
    """transformers' greedy token and log_softmax over the vocabulary at each of ``n`` steps."""
    import torch

    ids, steps = list(ids), []
    with torch.inference_mode():
        for _ in range(n):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            token = int(lp.argmax())
            steps.append((token, lp))
            ids.append(token)
    return steps


def chat_prompt_ids(tokenizer) -> list[int]:
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(prompt, add_special_tokens=False)


def model_id(stack) -> str:
    return httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]


def chat_body(stack, **extra) -> dict:
    return {
        "model": model_id(stack),
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 3,
        **extra,
    }


def assert_chat_matches_hf(content: list[dict], steps: list, tokenizer) -> None:
    assert len(content) == len(steps)
    for entry, (token, lp) in zip(content, steps, strict=True):
        top = entry["top_logprobs"]
        values = [t["logprob"] for t in top]
        assert len(top) == 3 and values == sorted(values, reverse=True) and values[0] <= 0
        assert entry["logprob"] == top[0]["logprob"] and entry["token"] == top[0]["token"]  # greedy: argmax
        assert entry["token"] == tokenizer.decode([token])
        assert bytes(entry["bytes"]) == bytes(top[0]["bytes"])
        assert entry["logprob"] == pytest.approx(lp[token].item(), abs=TOL)
        assert values == pytest.approx(lp.topk(3).values.tolist(), abs=TOL)


def test_chat_logprobs_through_pd_match_transformers(stack, hf):
    tokenizer, model = hf
    prompt_ids = chat_prompt_ids(tokenizer)
    assert len(prompt_ids) >= LOCAL_PREFILL_BELOW  # disaggregated: prefill worker, then decode worker
    steps = hf_steps(model, prompt_ids)
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat_body(stack), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == MAX_TOKENS
    assert_chat_matches_hf(content, steps, tokenizer)
    all_bytes = bytes(b for e in content for b in e["bytes"])
    assert all_bytes.decode("utf-8", "replace") == tokenizer.decode([t for t, _ in steps])

    _, chunks, payloads = stream_chat(
        stack.base_url, chat_body(stack, stream_options={"include_usage": True})
    )
    assert payloads[-1] == "[DONE]"
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"]]
    assert lps[0] is None  # the role chunk has no tokens
    streamed = [e for lp in lps[1:] for e in lp["content"]]
    assert len(streamed) == chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS
    assert_chat_matches_hf(streamed, steps, tokenizer)
    assert [e["token"] for e in streamed] == [e["token"] for e in content]


def test_completion_logprobs_prefilled_on_the_decode_worker(stack, hf):
    _, model = hf
    prompt = [5, 6, 7, 8]  # shorter than LOCAL_PREFILL_BELOW: the decode worker runs it whole
    steps = hf_steps(model, prompt, 6)
    body = {"model": model_id(stack), "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    url = f"{stack.base_url}/v1/completions"
    reply = httpx.post(url, json={**body, "logprobs": 2}, timeout=60).json()
    logprobs, text = reply["choices"][0]["logprobs"], reply["choices"][0]["text"]
    n = reply["usage"]["completion_tokens"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert n == 6 and all(len(logprobs[k]) == n for k in logprobs)
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert all(o <= len(text) for o in logprobs["text_offset"])
    for chosen, top, (token, lp) in zip(
        logprobs["token_logprobs"], logprobs["top_logprobs"], steps, strict=True
    ):
        assert chosen == pytest.approx(lp[token].item(), abs=TOL)
        assert 1 <= len(top) <= 2 and max(top.values()) == chosen
    assert httpx.post(url, json=body, timeout=60).json()["choices"][0]["logprobs"] is None

    with httpx.Client(timeout=60) as client:
        events = client.post(url, json={**body, "logprobs": 2, "stream": True}).text.splitlines()
    choices = [json.loads(e[6:])["choices"][0] for e in events if e.startswith("data: {")]
    streamed = {k: [v for c in choices for v in c["logprobs"][k]] for k in logprobs}
    assert streamed["tokens"] == logprobs["tokens"] and streamed["text_offset"] == logprobs["text_offset"]
    assert streamed["token_logprobs"] == pytest.approx(logprobs["token_logprobs"], abs=TOL)

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the prompt was prefilled on the decode worker (heartbeats)
        loads = {i.instance_id: i.load for i in list_instances(stack.controller_address)}
        if loads["decode-0"].prompt_tokens_total:
            break
        time.sleep(0.2)
    assert loads["decode-0"].prompt_tokens_total >= len(prompt)


@pytest.mark.parametrize(
    "extra, needle",
    [({"top_logprobs": 21}, "top_logprobs"), ({"logprobs": False, "top_logprobs": 2}, "logprobs")],
)
def test_bad_logprobs_get_400_and_server_keeps_serving(stack, extra, needle):
    url = f"{stack.base_url}/v1/chat/completions"
    response = httpx.post(url, json=chat_body(stack, **extra), timeout=30)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]
    body = chat_body(stack, max_tokens=2, logprobs=False, top_logprobs=None)
    reply = httpx.post(url, json=body, timeout=60).json()
    assert reply["usage"]["completion_tokens"] == 2 and reply["choices"][0]["logprobs"] is None


def test_grpc_generate_returns_logprobs(stack, hf):
    from pdmesh.rpc.client import open_channel
    from pdmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

    _, model = hf
    prompt = list(range(10, 30))  # disaggregated
    steps = hf_steps(model, prompt, 4)

    async def run():
        async with open_channel(stack.coordinator_grpc) as channel:
            request = coordinator_pb2.GenerateRequest(
                prompt_ids=coordinator_pb2.TokenIds(ids=prompt),
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3),
            )
            return [
                r async for r in coordinator_pb2_grpc.CoordinatorStub(channel).Generate(request, timeout=60)
            ]

    replies = asyncio.run(run())
    assert all(len(r.logprobs) == len(r.token_ids) for r in replies)
    tokens = [t for r in replies for t in r.token_ids]
    entries = [e for r in replies for e in r.logprobs]
    assert tokens == [t for t, _ in steps] and replies[-1].usage.completion_tokens == 4
    for token, entry, (_, lp) in zip(tokens, entries, steps, strict=True):
        assert len(entry.top) == 3 and entry.top[0].token_id == token
        assert entry.logprob == entry.top[0].logprob == pytest.approx(lp[token].item(), abs=TOL)
        for top in entry.top:
            assert top.logprob == pytest.approx(lp[top.token_id].item(), abs=TOL)
