"""/tokenize, /detokenize, MindIE's /infer and TGI's /generate(_stream) on a real PD stack, driven by
the clients written for them: httpx for vLLM's tokenizer routes, a client sending and reading /infer as
AISBench's ``mindie_stream_api`` does, Hugging Face's ``InferenceClient`` for TGI, and the ``openai``
client for the strictness of the OpenAI routes. Greedy native generations equal /v1/completions'.
"""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from pdmesh.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(180)

PROMPT = "The capital of France is"
N = 8  # tokens per generation: a few decode steps past the prefill's first token


@pytest.fixture(scope="module")
def tok(tiny_qwen3) -> Tokenizer:
    return Tokenizer.from_dir(tiny_qwen3)


@pytest.fixture(scope="module")
def client(pd_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pd_stack.base_url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def greedy_text(client) -> str:
    """What /v1/completions generates greedily: the native endpoints must generate the same."""
    completion = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=PROMPT,
        max_tokens=N,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert completion.usage.completion_tokens == N
    return completion.choices[0].text


def test_tokenize_and_detokenize_as_vllm_serves_them(pd_stack, tok, client) -> None:
    base = pd_stack.base_url
    answer = httpx.post(f"{base}/tokenize", json={"prompt": PROMPT}, timeout=10).json()
    assert answer["tokens"] == tok.encode(PROMPT) and answer["count"] == len(answer["tokens"])
    assert answer["max_model_len"] == client.models.list().data[0].model_extra["max_model_len"]
    back = httpx.post(f"{base}/detokenize", json={"tokens": answer["tokens"]}, timeout=10).json()
    assert back == {"prompt": PROMPT}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    chat = httpx.post(f"{base}/tokenize", json={"messages": messages}, timeout=10).json()
    completion = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=messages, max_tokens=1
    )
    assert chat["count"] == completion.usage.prompt_tokens


async def aisbench_stream(url: str, body: dict) -> tuple[str, list[dict]]:
    """POST /infer and read the events as AISBench's BaseAPIModel.stream_infer does: split on blank
    lines, drop ``data:``, parse JSON; MindieStreamApi keeps each event's ``generated_text``."""
    content, events = "", []
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        pending = b""
        async for chunk in response.content.iter_any():
            parts = (pending + chunk).replace(b"\r\n\r\n", b"\n\n").split(b"\n\n")
            pending = parts.pop()
            for part in filter(None, (p.strip() for p in parts)):
                data = json.loads(part.decode().removeprefix("data:").strip())
                events.append(data)
                content = data.get("generated_text", "")
        assert not pending.strip(), pending
    return content, events


def test_infer_streams_to_an_aisbench_client(pd_stack) -> None:
    """AISBench's default generation_kwargs (temperature 0.01, ignore_eos false) plus max_new_tokens."""
    body = {"inputs": PROMPT, "stream": True, "parameters": {"temperature": 0.01, "ignore_eos": False}}
    body["parameters"]["max_new_tokens"] = N
    content, events = asyncio.run(aisbench_stream(f"{pd_stack.base_url}/infer", body))
    assert events[0]["prefill_time"] >= 0 and events[0]["decode_time"] is None
    assert all(e["decode_time"] >= 0 and e["prefill_time"] is None for e in events[1:])
    assert "generated_text" in events[-1] and all("generated_text" not in e for e in events[:-1])
    assert content == "".join(e["token"]["text"] for e in events)
    assert 1 <= sum(len(e["token"]["id"]) for e in events) <= N


def test_infer_greedy_equals_the_completions_endpoint(pd_stack, greedy_text) -> None:
    params = {"max_new_tokens": N, "ignore_eos": True, "details": True}
    body = {"inputs": PROMPT, "stream": True, "parameters": params}
    content, events = asyncio.run(aisbench_stream(f"{pd_stack.base_url}/infer", body))
    assert content == greedy_text
    assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": N, "seed": None}
    whole = httpx.post(f"{pd_stack.base_url}/infer", json={**body, "stream": False}, timeout=30).json()
    assert whole == {"generated_text": greedy_text, "details": events[-1]["details"]}


def test_tgi_generate_with_the_huggingface_client(pd_stack, greedy_text, tok) -> None:
    tgi = InferenceClient(model=f"{pd_stack.base_url}/generate", timeout=30)
    out = tgi.text_generation(PROMPT, max_new_tokens=N, details=True, decoder_input_details=False)
    assert out.generated_text == greedy_text
    assert out.details.finish_reason == "length" and out.details.generated_tokens == N
    assert len(out.details.tokens) == N and all(t.logprob <= 0 for t in out.details.tokens)
    assert tok.decode([t.id for t in out.details.tokens]) == greedy_text
    full = tgi.text_generation(PROMPT, max_new_tokens=N, return_full_text=True)
    assert full == PROMPT + greedy_text


def test_tgi_generate_stream_with_the_huggingface_client(pd_stack, greedy_text) -> None:
    tgi = InferenceClient(model=f"{pd_stack.base_url}/generate_stream", timeout=30)
    events = list(tgi.text_generation(PROMPT, max_new_tokens=N, details=True, stream=True))
    assert [e.index for e in events] == list(range(1, N + 1))
    assert "".join(e.token.text for e in events) == events[-1].generated_text == greedy_text
    assert events[-1].details.finish_reason == "length" and events[-1].details.generated_tokens == N
    assert all(e.generated_text is None for e in events[:-1])


def test_tgi_grammar_constrains_the_output(pd_stack) -> None:
    """TGI's ``grammar`` (a regex, a JSON schema) holds across the PD split, as structured outputs do."""
    tgi = InferenceClient(model=f"{pd_stack.base_url}/generate", timeout=30)
    regex = {"type": "regex", "value": "[0-9]{3}-[a-z]{2}"}
    out = tgi.text_generation(PROMPT, max_new_tokens=16, grammar=regex, details=True)
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", out.generated_text), out.generated_text
    assert out.details.finish_reason == "eos_token"
    # a boolean: random weights could write an integer's digits for as long as max_new_tokens allows
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    schema["additionalProperties"] = False
    out = tgi.text_generation(
        PROMPT, max_new_tokens=32, grammar={"type": "json", "value": schema}, details=True
    )
    assert out.details.finish_reason == "eos_token", out.generated_text
    assert set(json.loads(out.generated_text)) == {"ok"}


def test_unknown_fields_and_roles_are_refused_on_the_real_stack(client) -> None:
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], extra_body={"guided_nonsense": 1}
        )
    assert unknown.value.body["param"] == "guided_nonsense"
    with pytest.raises(openai.BadRequestError) as role:
        client.chat.completions.create(
            model=model, messages=[{"role": "function", "content": "hi", "name": "f"}]
        )
    assert role.value.body["param"] == "messages.0.role"
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=model, prompt="hi", logit_bias={"5": 10})
    assert refused.value.body["param"] == "logit_bias"
    assert "not supported by pdmesh" in refused.value.body["message"]
