"""End to end over real processes: chat over HTTP (streamed and not), PD against mixed against
transformers, concurrency, the official openai client, gRPC Generate, and no leaked KV blocks."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.helpers import stream_chat, wait_blocks_idle

pytestmark = pytest.mark.timeout(240)

MESSAGES = [{"role": "user", "content": "Tell me about the weather near the sea."}]


def chat(base_url: str, **body) -> httpx.Response:
    payload = {"model": "ignored-by-fixture", "messages": MESSAGES, **body}
    return httpx.post(f"{base_url}/v1/chat/completions", json=payload, timeout=60)


def model_id(stack) -> str:
    return httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]


def greedy_chat(stack, max_tokens: int = 24) -> dict:
    response = chat(
        stack.base_url, model=model_id(stack), temperature=0, max_tokens=max_tokens, ignore_eos=True
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_models_lists_the_served_model(pd_stack, tiny_qwen3):
    body = httpx.get(f"{pd_stack.base_url}/v1/models", timeout=10).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [tiny_qwen3.name]


def test_chat_not_streamed_has_text_and_usage(pd_stack):
    body = greedy_chat(pd_stack, max_tokens=12)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12


def test_chat_streamed_ends_with_usage_and_done(pd_stack):
    text, chunks, payloads = stream_chat(
        pd_stack.base_url,
        {
            "model": model_id(pd_stack),
            "messages": MESSAGES,
            "temperature": 0,
            "max_tokens": 12,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert payloads[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert text == greedy_chat(pd_stack, max_tokens=12)["choices"][0]["message"]["content"]


@pytest.mark.parametrize("stack_name", ["pd_stack", "mixed_stack"])
def test_stream_sends_one_chunk_per_token(stack_name, request):
    """What a client timing each chunk (inter-token latency) relies on: N tokens, N chunks."""
    stack, n = request.getfixturevalue(stack_name), 9
    body = {"model": model_id(stack), "max_tokens": n, "ignore_eos": True, "temperature": 0}
    text, chunks, _ = stream_chat(stack.base_url, {**body, "messages": MESSAGES})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(chunks[1:]) == n and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert text == greedy_chat(stack, max_tokens=n)["choices"][0]["message"]["content"]
    completion = {**body, "prompt": "The sea is", "stream": True}
    response = httpx.post(f"{stack.base_url}/v1/completions", json=completion, timeout=60)
    events = [e for e in response.text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]" and len(events[:-1]) == n


def test_pd_equals_mixed_equals_transformers(pd_stack, mixed_stack, tiny_qwen3):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pd_text = greedy_chat(pd_stack)["choices"][0]["message"]["content"]
    mixed_text = greedy_chat(mixed_stack)["choices"][0]["message"]["content"]
    assert pd_text == mixed_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    hf_text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert pd_text == hf_text


def test_eight_concurrent_streams_complete(pd_stack):
    body = {
        "model": model_id(pd_stack),
        "messages": MESSAGES,
        "max_tokens": 16,
        "ignore_eos": True,
        "seed": 7,
    }
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: stream_chat(pd_stack.base_url, {**body, "seed": i}), range(8)))
    for _, chunks, payloads in results:
        assert payloads[-1] == "[DONE]"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    wait_blocks_idle(pd_stack.controller_address)


@pytest.mark.parametrize(
    "payload, status, needle",
    [
        ("{not json", 400, "JSON"),
        ({"messages": []}, 400, "messages"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_tokens": 100000}, 400, "context"),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "context"),
        ({"model": "no-such-model"}, 404, "no-such-model"),
        ({"temperature": -1}, 400, "temperature"),
    ],
)
def test_bad_input_gets_openai_error_and_server_keeps_serving(pd_stack, payload, status, needle):
    url = f"{pd_stack.base_url}/v1/chat/completions"
    if isinstance(payload, str):
        response = httpx.post(url, content=payload, headers={"content-type": "application/json"}, timeout=30)
    else:
        body = {"model": model_id(pd_stack), "messages": MESSAGES, "max_tokens": 4, **payload}
        response = httpx.post(url, json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle.lower() in error["message"].lower()
    assert error["type"]
    assert greedy_chat(pd_stack, max_tokens=4)["usage"]["completion_tokens"] == 4


def test_completions_endpoint(pd_stack):
    response = httpx.post(
        f"{pd_stack.base_url}/v1/completions",
        json={
            "model": model_id(pd_stack),
            "prompt": "The sea is",
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": True,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 8


def test_official_openai_client(pd_stack):
    from openai import OpenAI

    client = OpenAI(base_url=f"{pd_stack.base_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    greedy = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},  # our extension, sent the way the client sends any
    }
    reply = client.chat.completions.create(**greedy)
    answer = reply.choices[0].message.content
    assert answer and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8
    stream = client.chat.completions.create(**greedy, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # the stream spells out the same greedy answer as the plain call
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer


def test_grpc_generate_stream(pd_stack):
    from pdmesh.rpc.client import open_channel
    from pdmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

    async def run():
        async with open_channel(pd_stack.coordinator_grpc) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            request = coordinator_pb2.GenerateRequest(
                prompt="The sea is",
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
            )
            return [r async for r in stub.Generate(request, timeout=60)]

    replies = asyncio.run(run())
    assert replies[-1].finished and replies[-1].usage.completion_tokens == 6
    assert sum(len(r.token_ids) for r in replies) == 6


def test_grpc_generate_checks_lengths_as_http_does(pd_stack):
    import grpc

    from pdmesh.rpc.client import open_channel
    from pdmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

    limit = httpx.get(f"{pd_stack.base_url}/v1/models", timeout=10).json()["data"][0]["max_model_len"]

    async def run(ids: list[int], max_tokens: int):
        async with open_channel(pd_stack.coordinator_grpc) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            request = coordinator_pb2.GenerateRequest(
                prompt_ids=coordinator_pb2.TokenIds(ids=ids),
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
            )
            try:
                return [r async for r in stub.Generate(request, timeout=60)]
            except grpc.aio.AioRpcError as exc:
                return exc

    too_long = asyncio.run(run([5] * limit, 0))
    assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"maximum context length is {limit} tokens" in too_long.details()
    assert f"your prompt has {limit} tokens" in too_long.details()
    over = asyncio.run(run([5] * 10, limit))
    assert (
        over.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "Please reduce the prompt or max_tokens" in over.details()
    )
    # unset max_tokens: the context left after the prompt (capped at 256), as over HTTP
    replies = asyncio.run(run([5] * (limit - 3), 0))
    assert replies[-1].finished and replies[-1].usage.completion_tokens == 3


def test_no_kv_blocks_leak(pd_stack):
    instances = wait_blocks_idle(pd_stack.controller_address)
    assert {i.instance_id for i in instances} == {"prefill-0", "decode-0"}


def test_streamed_chunks_are_json(pd_stack):
    from openai.types.chat import ChatCompletionChunk

    model = model_id(pd_stack)
    response = httpx.post(
        f"{pd_stack.base_url}/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, "max_tokens": 3, "stream": True},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [event for event in response.text.split("\n\n") if event.strip()]
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    payloads = [event[len("data: ") :] for event in events]
    assert payloads[-1] == "[DONE]"
    # every other event is one JSON object that the official client's chunk type accepts
    chunks = [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]
    assert chunks and len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" and c.model == model for c in chunks)
