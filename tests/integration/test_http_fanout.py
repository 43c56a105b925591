"""Several choices per request on the HTTP front (http_fanout.py) over the echoing test backend:
prompt lists, n, best_of, their numbering, usage, seeds, streaming and refusals. The real mesh (the
samples sharing a prompt's KV, PD and mixed) is covered by tests/e2e/test_fanout.py."""

from __future__ import annotations

import pytest

from pdmesh.errors import ErrorKind
from services.coordinator.backend import GenerationChunk, GenerationError
from services.coordinator.fanout import MAX_SEQUENCES
from tests.integration.http_harness import MESSAGES, EchoBackend, assert_error, call, sse_events

pytestmark = pytest.mark.timeout(60)


def post(app, path: str, body: dict):
    return call(app, "POST", path, json=body)


def test_prompt_list_and_n_number_choices_as_vllm(app, backend, tok) -> None:
    prompts = ["Hello world", "The quick brown fox"]
    body = post(app, "/v1/completions", {"prompt": prompts, "n": 2, "seed": 7, "max_tokens": 50}).json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [
        (0, prompts[0]),
        (1, prompts[0]),
        (2, prompts[1]),
        (3, prompts[1]),
    ]
    lengths = [len(tok.encode(p)) for p in prompts]
    completion = 2 * (lengths[0] + 1) + 2 * (lengths[1] + 1)  # each echo, then the end-of-sequence id
    assert body["usage"] == {
        "prompt_tokens": sum(lengths),  # each prompt once
        "completion_tokens": completion,
        "total_tokens": sum(lengths) + completion,
    }
    ids = [request_id for request_id, _, _ in backend.calls]
    assert sorted(ids) == [f"{body['id']}-{k}" for k in range(4)] and set(ids) <= backend.closed
    seeds = {request_id: sampling.seed for request_id, _, sampling in backend.calls}
    assert [seeds[f"{body['id']}-{k}"] for k in range(4)] == [7, 8, 7, 8]  # vLLM's seed + index


def test_token_id_prompts(app, backend, tok) -> None:
    ids = tok.encode("one two three")
    one = post(app, "/v1/completions", {"prompt": ids, "max_tokens": 50}).json()
    assert len(one["choices"]) == 1 and one["choices"][0]["text"] == "one two three"  # one prompt
    batch = post(app, "/v1/completions", {"prompt": [ids, ids[:1]], "max_tokens": 50}).json()
    assert [c["text"] for c in batch["choices"]] == ["one two three", tok.decode(ids[:1])]


class RankedBackend(EchoBackend):
    """Answers one token per request, chosen by its seed, with a logprob that ranks the seeds."""

    SCORES = {0: -3.0, 1: -1.0, 2: -2.0}

    async def generate(self, request_id, prompt_ids, sampling, affinity=None):
        self.calls.append((request_id, list(prompt_ids), sampling))
        token = prompt_ids[sampling.seed]
        lps = (
            [(self.SCORES[sampling.seed], {token: self.SCORES[sampling.seed]})] if sampling.logprobs else None
        )
        yield GenerationChunk([token], True, "length", lps)
        self.closed.add(request_id)


@pytest.mark.parametrize("chat", [False, True])
def test_best_of_answers_the_likeliest_samples(tok, chat) -> None:
    from services.coordinator.http_app import create_app
    from tests.integration.http_harness import MAX_MODEL_LEN, MODEL

    backend = RankedBackend(eos_id=tok.token_to_id("<|im_end|>"))
    app = create_app(backend, MODEL, tok, MAX_MODEL_LEN)
    words = tok.encode("alpha beta gamma")
    if chat:
        request = {"messages": MESSAGES, "n": 2, "best_of": 3, "seed": 0}
        body = post(app, "/v1/chat/completions", request).json()
        prompt_ids = backend.calls[0][1]
        texts = [c["message"]["content"] for c in body["choices"]]
    else:
        body = post(app, "/v1/completions", {"prompt": words, "n": 2, "best_of": 3, "seed": 0}).json()
        prompt_ids = words
        texts = [c["text"] for c in body["choices"]]
    assert len(backend.calls) == 3 and all(sampling.logprobs == 1 for _, _, sampling in backend.calls)
    assert texts == [tok.decode([prompt_ids[1]]), tok.decode([prompt_ids[2]])]  # seeds 1 then 2
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in body["choices"])  # ranked by them, not asked for
    assert body["usage"]["completion_tokens"] == 2


def test_streamed_chat_n(app, backend) -> None:
    response = post(
        app,
        "/v1/chat/completions",
        {"messages": MESSAGES, "n": 2, "stream": True, "stream_options": {"include_usage": True}},
    )
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    content = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        content[choice["index"]] += choice["delta"].get("content") or ""
    roles = [c["choices"][0]["index"] for c in chunks[:-1] if c["choices"][0]["delta"].get("role")]
    assert sorted(roles) == [0, 1] and content[0] == content[1] and content[0]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 2 * backend.sent[backend.calls[0][0]]


def test_a_failing_sample_ends_the_stream_with_its_error(app, backend) -> None:
    backend.fail_after = (2, GenerationError("decode instance died", ErrorKind.UPSTREAM_FAILED))
    events = sse_events(post(app, "/v1/completions", {"prompt": "a b c d e f", "n": 3, "stream": True}))
    assert events[-1] == "[DONE]" and "decode instance died" in events[-2]["error"]["message"]
    assert [e for e in events[:-1] if "error" in e] == [events[-2]]  # one error event
    assert {request_id for request_id, _, _ in backend.calls} <= backend.closed


def test_refusals(app) -> None:
    completions = "/v1/completions"
    assert_error(post(app, completions, {"prompt": "x", "n": 3, "best_of": 2}), 400, "best_of")
    error = assert_error(
        post(app, completions, {"prompt": "x", "n": 1, "best_of": 2, "stream": True}), 400, "stream"
    )
    assert error["param"] == "best_of"
    too_many = assert_error(post(app, completions, {"prompt": "x", "n": MAX_SEQUENCES + 1}), 400, "at most")
    assert too_many["param"] == "n"
    batch = {"prompt": ["x"] * (MAX_SEQUENCES // 2 + 1), "n": 2}
    assert assert_error(post(app, completions, batch), 400, "sequences")["param"] == "prompt"
    assert_error(post(app, "/v1/chat/completions", {"messages": MESSAGES, "n": 0}), 400, "n")
    assert_error(post(app, "/v1/chat/completions", {"messages": MESSAGES, "best_of": 0}), 400, "best_of")
