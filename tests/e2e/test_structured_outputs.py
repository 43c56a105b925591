"""Structured outputs through real stacks: a random checkpoint (which knows nothing of JSON) answers
``response_format`` json_schema with JSON that validates, and vLLM's guided_* extras and
``structured_outputs`` with text that follows them, in PD (the prefill worker's first token obeys,
the decode worker continues the matcher) and mixed mode, streamed and not; PD and mixed agree at
temperature 0; bad constraints are 400s naming the field; gRPC Generate carries the constraint."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest
from openai import OpenAI

from pdmesh.rpc.client import open_channel
from pdmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from tests.e2e.conftest import start_stack
from tests.e2e.helpers import stream_chat, wait_until
from tests.structured_cases import SCHEMA

pytestmark = pytest.mark.timeout(180)

RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["yes", "no", "maybe so"]
GRAMMAR = 'root ::= "(" [0-9] [0-9]? ("+" [0-9] [0-9]?)? ")"'
MAX_TOKENS = 80


@pytest.fixture(params=["pd_stack", "mixed_stack"])
def stack(request):
    return request.getfixturevalue(request.param)


def client_of(stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


def chat_json(client: OpenAI, stream: bool, **kw) -> tuple[str, str]:
    """(content, finish_reason) of a response_format json_schema chat completion."""
    args = {"model": client.models.list().data[0].id, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    args.update(kw)
    if not stream:
        reply = client.chat.completions.create(response_format=RESPONSE_FORMAT, **args)
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    chunks = list(client.chat.completions.create(response_format=RESPONSE_FORMAT, stream=True, **args))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1]


def test_json_schema_through_the_openai_client(stack) -> None:
    client = client_of(stack)
    greedy, reason = chat_json(client, stream=False, temperature=0)
    assert reason == "stop"
    jsonschema.validate(json.loads(greedy), SCHEMA)
    streamed, reason = chat_json(client, stream=True, temperature=0)
    assert (streamed, reason) == (greedy, "stop")
    for seed in (1, 2):
        sampled, reason = chat_json(client, stream=bool(seed % 2), temperature=1.0, seed=seed)
        assert reason == "stop"
        jsonschema.validate(json.loads(sampled), SCHEMA)


def completion(client: OpenAI, stream: bool, prompt: str = "Answer:", **extra) -> tuple[str, str]:
    args = {"model": client.models.list().data[0].id, "prompt": prompt, "max_tokens": MAX_TOKENS}
    args.update(temperature=1.0, seed=5, extra_body=extra)
    if not stream:
        reply = client.completions.create(**args)
        return reply.choices[0].text, reply.choices[0].finish_reason
    chunks = list(client.completions.create(stream=True, **args))
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


def test_vllm_extras_streamed_and_not(stack) -> None:
    client = client_of(stack)
    for stream in (False, True):
        text, reason = completion(client, stream, guided_regex=REGEX)
        assert reason == "stop" and re.fullmatch(REGEX, text), text
        text, reason = completion(client, stream, guided_choice=CHOICES)
        assert reason == "stop" and text in CHOICES
        text, reason = completion(client, stream, guided_grammar=GRAMMAR)
        assert reason == "stop" and re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})?\)", text), text
        text, reason = completion(client, stream, guided_json=SCHEMA)
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
        text, reason = completion(client, stream, structured_outputs={"choice": CHOICES})
        assert reason == "stop" and text in CHOICES


def test_json_object_and_text_formats(stack) -> None:
    client = client_of(stack)
    model = client.models.list().data[0].id
    # this checkpoint's greedy answer closes the object at once (any object may grow without end)
    reply = client.completions.create(
        model=model, prompt="hello world", max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].text), dict)
    plain = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4, temperature=0, response_format={"type": "text"},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert plain.choices[0].finish_reason == "length"


def test_pd_and_mixed_agree_at_temperature_0(pd_stack, mixed_stack) -> None:
    pd, _ = chat_json(client_of(pd_stack), stream=False, temperature=0)
    mixed, _ = chat_json(client_of(mixed_stack), stream=True, temperature=0)
    assert pd == mixed


@pytest.mark.parametrize(
    ("extra", "param", "needle"),
    [
        ({"guided_regex": "a(b"}, "guided_regex", "invalid regex"),
        (
            {"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}},
            "guided_json",
            "invalid JSON",
        ),
        ({"guided_grammar": "root ::= missing"}, "guided_grammar", "invalid grammar"),
        ({"guided_choice": []}, "guided_choice", "invalid choice list"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "only one structured output"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "is required"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ],
)
def test_bad_constraints_are_400s_naming_the_field(pd_stack, extra, param, needle) -> None:
    client = client_of(pd_stack)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(
            model=client.models.list().data[0].id, prompt="x", max_tokens=4, extra_body=extra
        )
    error = refused.value.body
    assert needle in error["message"] and error["param"] == param, error


def test_grpc_generate_carries_the_constraint(pd_stack) -> None:
    async def generate(structured: common_pb2.StructuredOutput) -> list:
        async with open_channel(pd_stack.coordinator_grpc) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            sampling = common_pb2.SamplingParams(
                temperature=1.0, seed=3, max_tokens=MAX_TOKENS, structured=structured
            )
            request = coordinator_pb2.GenerateRequest(prompt="Code:", sampling=sampling)
            return [r async for r in stub.Generate(request, timeout=60)]

    replies = asyncio.run(generate(common_pb2.StructuredOutput(kind="regex", spec=REGEX)))
    assert replies[-1].finished and re.fullmatch(REGEX, "".join(r.text for r in replies))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(generate(common_pb2.StructuredOutput(kind="regex", spec="a(b")))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid regex" in refused.value.details()


# Long enough (a hundred-odd tokens) that the streams are still running when a decode worker dies.
LONG_SCHEMA = {
    "type": "object",
    "properties": {
        "values": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 999},
            "minItems": 40,
            "maxItems": 40,
        }
    },
    "required": ["values"],
    "additionalProperties": False,
}
FAST_HEALTH = {"heartbeat-interval-s": "0.2", "suspect-after-s": "0.6", "dead-after-s": "1.2"}


def test_a_stream_migrated_mid_way_still_validates(model_factory, tmp_path_factory) -> None:
    """A decode worker killed mid-stream: each request goes on elsewhere from prompt + what was sent,
    the matcher resumes after those tokens, and every output validates (and, greedy, equals an
    uninterrupted run)."""
    stack = start_stack(
        model_factory("qwen3", "small"), tmp_path_factory, prefill=1, decode=2, controller_args=FAST_HEALTH
    )
    try:
        model = client_of(stack).models.list().data[0].id
        response_format = {"type": "json_schema", "json_schema": {"name": "values", "schema": LONG_SCHEMA}}
        body = {"model": model, "messages": MESSAGES, "max_tokens": 300, "temperature": 0}
        body["response_format"] = response_format
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(stream_chat, stack.base_url, body, 120) for _ in range(6)]
            # decode-0 holds a stream once it has pulled a request's KV
            wait_until(
                lambda: "pulled" in stack.log_tail("decode-0", 50), 30, "a pull on decode-0", poll_s=0.01
            )
            stack.kill("decode-0", signal.SIGKILL)
            results = [f.result() for f in futures]
        reference, _, _ = stream_chat(stack.base_url, body)
        jsonschema.validate(json.loads(reference), LONG_SCHEMA)
        for text, chunks, payloads in results:
            assert payloads[-1] == "[DONE]"
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
            assert text == reference
        assert "retrying" in stack.log_tail("coordinator", 400)
    finally:
        stack.stop()
