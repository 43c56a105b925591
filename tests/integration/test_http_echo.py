"""Echo and prompt logprobs through the HTTP front over an echoing backend that attaches made-up prompt
logprobs to its first chunk: the shapes (vLLM's), streamed echo with stop strings, token-id prompts,
and refused requests. The real mesh is covered by tests/e2e/test_echo.py."""

from __future__ import annotations

import pytest

from tests.integration.http_harness import MESSAGES, EchoBackend, assert_error, call, sse_events

pytestmark = pytest.mark.timeout(60)


def prompt_entry(token: int) -> tuple[float, int, dict[int, float]]:
    """A made-up entry: the token ranks 2nd, behind token + 1."""
    chosen = -(token % 5) / 4 - 0.5
    return chosen, 2, {token + 1: chosen + 0.25, token: chosen, token + 2: chosen - 1}


class PromptLogprobBackend(EchoBackend):
    """EchoBackend whose first chunk carries prompt logprobs when the request asks for them."""

    async def generate(self, request_id, prompt_ids, sampling, affinity=None):
        first = True
        async for chunk in super().generate(request_id, prompt_ids, sampling):
            if first and sampling.prompt_logprobs is not None:
                chunk.prompt_logprobs = [None, *(prompt_entry(t) for t in prompt_ids[1:])]
            first = False
            yield chunk


@pytest.fixture
def backend(tok) -> PromptLogprobBackend:
    return PromptLogprobBackend(eos_id=tok.token_to_id("<|im_end|>"))


PROMPT = "Hello world! The quick brown fox"


def completions(app, **extra):
    return call(app, "POST", "/v1/completions", json={"prompt": PROMPT, **extra})


def test_echo_max_tokens_zero_returns_the_prompt_and_its_logprobs(app, backend, tok) -> None:
    body = completions(app, echo=True, logprobs=1, max_tokens=0).json()
    ids = tok.encode(PROMPT)
    assert backend.calls[0][2].max_tokens == 1 and backend.calls[0][2].prompt_logprobs == 1
    choice = body["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lps = choice["logprobs"]
    assert lps["tokens"] == [tok.decode([t]) for t in ids]
    assert lps["token_logprobs"] == [None, *(prompt_entry(t)[0] for t in ids[1:])]
    assert lps["top_logprobs"][0] is None
    for token, top in zip(ids[1:], lps["top_logprobs"][1:], strict=True):
        chosen, _, alternatives = prompt_entry(token)
        assert top == {tok.decode([token]): chosen, tok.decode([token + 1]): chosen + 0.25}
    assert lps["text_offset"] == [len(tok.decode(ids[:i])) for i in range(len(ids))]
    field = choice["prompt_logprobs"]
    assert field[0] is None and len(field) == len(ids)
    entry = field[1][str(ids[1])]
    assert entry == {"logprob": prompt_entry(ids[1])[0], "rank": 2, "decoded_token": tok.decode([ids[1]])}
    assert field[1][str(ids[1] + 1)]["rank"] == 1 and len(field[1]) == 3


def test_echo_without_logprobs_and_with_a_completion(app, backend, tok) -> None:
    backend.output_ids = tok.encode(" jumps over")
    body = completions(app, echo=True, max_tokens=2).json()
    choice = body["choices"][0]
    assert choice["text"] == PROMPT + " jumps over" and choice["logprobs"] is None
    assert choice["prompt_logprobs"] is None and backend.calls[0][2].prompt_logprobs is None
    assert body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("stops", [[], ["over"]])
def test_streamed_echo_comes_first_and_offsets_count_from_the_prompt(app, backend, tok, stops) -> None:
    backend.output_ids = tok.encode(" jumps over the dog")
    events = sse_events(completions(app, echo=True, logprobs=0, stream=True, stop=stops, max_tokens=4))[:-1]
    choices = [e["choices"][0] for e in events]
    assert choices[0]["text"].startswith(PROMPT) and "prompt_logprobs" not in choices[0]
    text = "".join(c["text"] for c in choices)
    assert text == PROMPT + (" jumps " if stops else " jumps over the dog")
    offsets = [o for c in choices for o in c["logprobs"]["text_offset"]]
    tokens = [t for c in choices for t in c["logprobs"]["tokens"]]
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
    assert choices[0]["logprobs"]["token_logprobs"][0] is None


def test_echo_of_token_ids_decodes_them(app, backend, tok) -> None:
    ids = tok.encode("<|im_start|>user hi")
    body = call(app, "POST", "/v1/completions", json={"prompt": ids, "echo": True, "max_tokens": 0}).json()
    assert body["choices"][0]["text"] == "<|im_start|>user hi"


@pytest.mark.parametrize("n", [1, 2])
def test_chat_prompt_logprobs(app, backend, n: int) -> None:
    body = call(
        app,
        "POST",
        "/v1/chat/completions",
        json={"messages": MESSAGES, "prompt_logprobs": 0, "max_tokens": 1, "n": n},
    ).json()
    prompt_ids = backend.calls[0][1]
    assert len(body["choices"]) == n
    assert body["prompt_logprobs"][0] is None and len(body["prompt_logprobs"]) == len(prompt_ids)
    assert backend.calls[0][2].prompt_logprobs == 0


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
        ("/v1/completions", {"prompt_logprobs": -1}, "prompt_logprobs"),
        ("/v1/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ("/v1/chat/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ],
)
def test_bad_echo_requests(app, backend, path, extra, param) -> None:
    base = {"messages": MESSAGES} if "chat" in path else {"prompt": "hi"}
    error = assert_error(call(app, "POST", path, json={**base, **extra}), 400, param)
    assert error["param"] == param
    assert not backend.calls
