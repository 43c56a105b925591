"""Several choices per request end to end (real processes, the official openai client): lists of
prompts, ``n`` > 1 and ``best_of`` on a PD stack and a mixed one, streamed and not, and gRPC
Generate's ``n``. At temperature 0 PD and mixed answer the same and all samples agree; seeded samples
draw with vLLM's ``seed + index``; the samples of a prompt share its KV: the workers' prefix-cache
counters show each prompt computed once, its other samples served from the cache."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from openai import BadRequestError, OpenAI

from tests.e2e.conftest import start_stack
from tests.e2e.helpers import list_instances, wait_blocks_idle, wait_until

pytestmark = pytest.mark.timeout(300)

BLOCK = 16  # the workers' KV block size (default)
PROMPT_LEN = 40  # two full blocks a later sample finds cached; the partial third it computes itself
CACHED = (PROMPT_LEN - 1) // BLOCK * BLOCK  # the cache always leaves one token to compute
MAX_TOKENS = 6
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def stacks(tiny_qwen3, tmp_path_factory) -> Iterator[dict]:
    started = {}
    try:
        for mode, prefill, decode in (("pd", 1, 1), ("mixed", 2, 0)):
            started[mode] = start_stack(
                tiny_qwen3,
                tmp_path_factory,
                prefill=prefill,
                decode=decode,
                mode=mode,
                controller_args={"heartbeat-interval-s": "0.2"},
            )
        yield started
    finally:
        for stack in started.values():
            stack.stop()


def client(stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def model_of(stack) -> str:
    return client(stack).models.list().data[0].id


def prompt(first: int) -> list[int]:
    """A prompt of its own per test (no test finds another's blocks in the cache)."""
    return list(range(first, first + PROMPT_LEN))


def cache_counters(stack) -> tuple[int, int]:
    """(prompt tokens looked up, found) in the prefix caches of the instances that prefill."""
    computing = [
        i for i in list_instances(stack.controller_address) if not i.instance_id.startswith("decode")
    ]
    return (
        sum(i.load.prefix_cache_query_tokens for i in computing),
        sum(i.load.prefix_cache_hit_tokens for i in computing),
    )


def test_prompt_list_with_n_shares_each_prompt_and_pd_equals_mixed(stacks):
    prompts = [prompt(100), prompt(300)]
    texts = {}
    for mode, stack in stacks.items():
        queried, hit = cache_counters(stack)
        reply = client(stack).completions.create(model=model_of(stack), prompt=prompts, n=2, **GREEDY)
        assert [c.index for c in reply.choices] == [0, 1, 2, 3]  # prompt i, sample j: i * n + j
        texts[mode] = [c.text for c in reply.choices]
        assert texts[mode][0] == texts[mode][1] and texts[mode][2] == texts[mode][3]  # greedy samples agree
        assert texts[mode][0] != texts[mode][2]
        assert reply.usage.prompt_tokens == 2 * PROMPT_LEN  # each prompt once
        assert reply.usage.completion_tokens == 4 * MAX_TOKENS  # every choice
        looked_up = queried + 4 * PROMPT_LEN
        wait_until(lambda s=stack, n=looked_up: cache_counters(s)[0] >= n, 10, f"{mode}: prefills reported")
        now_queried, now_hit = cache_counters(stack)
        assert now_queried == looked_up
        # per prompt: the first sample computed it all, the second found its full blocks cached
        assert now_hit - hit == 2 * CACHED, mode
    assert texts["pd"] == texts["mixed"]


def test_chat_n_streamed_and_not(stacks):
    messages = [{"role": "user", "content": "Name three colours of the sea, please."}]
    answers = {}
    for mode, stack in stacks.items():
        api, model = client(stack), model_of(stack)
        whole = api.chat.completions.create(model=model, messages=messages, n=2, **GREEDY)
        assert [c.index for c in whole.choices] == [0, 1]
        contents = [c.message.content for c in whole.choices]
        assert contents[0] == contents[1] and contents[0]
        streamed = ["", ""]
        roles, finished, usage = set(), set(), None
        chunks = api.chat.completions.create(
            model=model, messages=messages, n=2, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
        for chunk in chunks:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                streamed[choice.index] += choice.delta.content or ""
                roles |= {choice.index} if choice.delta.role == "assistant" else set()
                finished |= {choice.index} if choice.finish_reason else set()
        assert streamed == contents and roles == finished == {0, 1}
        assert usage.completion_tokens == 2 * MAX_TOKENS and usage.prompt_tokens == whole.usage.prompt_tokens
        answers[mode] = contents
        # a client leaving mid-stream ends every sample; no KV block stays held
        left = api.chat.completions.create(
            model=model, messages=messages, n=2, stream=True, temperature=0, max_tokens=200
        )
        next(iter(left))
        left.close()
        wait_blocks_idle(stack.controller_address)
    assert answers["pd"] == answers["mixed"]


def test_seeded_samples_use_vllm_seeds_and_best_of_picks_the_likeliest(stacks):
    stack = stacks["pd"]
    api, model = client(stack), model_of(stack)
    sampled = {"temperature": 1.0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}}
    ids, seed = prompt(500), 1234
    reply = api.completions.create(model=model, prompt=ids, n=2, seed=seed, **sampled)
    alone = [
        api.completions.create(model=model, prompt=ids, seed=seed + j, logprobs=1, **sampled).choices[0]
        for j in range(3)
    ]
    assert [c.text for c in reply.choices] == [a.text for a in alone[:2]]  # sample j drew with seed + j
    assert reply.choices[0].text != reply.choices[1].text

    best = api.completions.create(model=model, prompt=ids, n=1, best_of=3, seed=seed, **sampled)
    likeliest = max(alone, key=lambda a: sum(a.logprobs.token_logprobs))
    assert [c.text for c in best.choices] == [likeliest.text] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == MAX_TOKENS  # the choices answered
    with pytest.raises(BadRequestError, match="best_of"):
        api.completions.create(model=model, prompt=ids, n=1, best_of=2, stream=True, **sampled)


def test_grpc_generate_n(stacks):
    from pdmesh.rpc.client import open_channel
    from pdmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

    async def run(stack, n=2):
        async with open_channel(stack.coordinator_grpc) as channel:
            request = coordinator_pb2.GenerateRequest(
                prompt_ids=coordinator_pb2.TokenIds(ids=prompt(700)),
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                n=n,
            )
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            return [r async for r in stub.Generate(request, timeout=60)]

    tokens = {}
    for mode, stack in stacks.items():
        replies = asyncio.run(run(stack))
        samples = [[r for r in replies if r.index == j] for j in range(2)]
        assert len(replies) == sum(len(s) for s in samples)  # every message belongs to sample 0 or 1
        for sample in samples:
            assert [r.finished for r in sample].count(True) == 1 and sample[-1].finished
            assert sample[-1].usage.completion_tokens == MAX_TOKENS
        tokens[mode] = [[t for r in sample for t in r.token_ids] for sample in samples]
        assert tokens[mode][0] == tokens[mode][1]
    assert tokens["pd"] == tokens["mixed"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(run(stacks["pd"], n=-1))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n must be" in refused.value.details()
