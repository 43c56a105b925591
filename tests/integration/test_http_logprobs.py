"""Logprobs through the HTTP front over an echoing backend that attaches logprobs to its tokens:
the OpenAI shapes (chat and completions, whole and streamed), stop strings, and refused requests.
The real mesh is covered by tests/e2e/test_logprobs.py."""

from __future__ import annotations

import pytest

from tests.integration.http_harness import (
    MESSAGES,
    EchoBackend,
    assert_error,
    call,
    sse_events,
)

pytestmark = pytest.mark.timeout(60)


def lp(token: int) -> tuple[float, dict[int, float]]:
    """A made-up entry: the token is the most likely, then the next ids."""
    chosen = -(token % 7) / 8 - 0.125
    return chosen, {token: chosen, token + 1: chosen - 1, token + 2: chosen - 2, token + 3: chosen - 3}


class LogprobBackend(EchoBackend):
    """EchoBackend whose chunks carry logprobs when the request asks for them."""

    async def generate(self, request_id, prompt_ids, sampling, affinity=None):
        async for chunk in super().generate(request_id, prompt_ids, sampling):
            if sampling.logprobs > 0:
                chunk.logprobs = [lp(t) for t in chunk.token_ids]
            yield chunk


@pytest.fixture
def backend(tok) -> LogprobBackend:
    """Overrides conftest's echoing backend (its ``app`` and ``tok`` fixtures serve this one)."""
    return LogprobBackend(eos_id=tok.token_to_id("<|im_end|>"))


def chat(app, **extra):
    return call(app, "POST", "/v1/chat/completions", json={"messages": MESSAGES, **extra})


REPLY = "Sure: 你好 🎉 naïve café"


def test_chat_logprobs(app, backend, tok) -> None:
    backend.output_ids = tok.encode(REPLY)
    body = chat(app, logprobs=True, top_logprobs=2).json()
    ids = backend.output_ids + [tok.token_to_id("<|im_end|>")]
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == len(ids)
    for entry, token in zip(content, ids, strict=True):
        chosen, top = lp(token)
        assert entry["token"] == tok.decode([token], skip_special_tokens=False)
        assert entry["logprob"] == chosen
        assert [t["logprob"] for t in entry["top_logprobs"]] == list(top.values())[:2]
        assert [t["token"] for t in entry["top_logprobs"]][0] == entry["token"]
    assert body["choices"][0]["message"]["content"] == REPLY  # the end token is not text
    assert bytes(b for e in content[:-1] for b in e["bytes"]).decode() == REPLY


@pytest.mark.parametrize("extra", [{}, {"logprobs": False}])
def test_chat_without_logprobs_is_null(app, backend, extra) -> None:
    assert chat(app, **extra).json()["choices"][0]["logprobs"] is None
    assert backend.calls[0][2].logprobs == 0
    events = sse_events(chat(app, stream=True, **extra))[:-1]
    assert all(e["choices"][0]["logprobs"] is None for e in events)


def test_chat_top_logprobs_zero_still_has_the_chosen_tokens(app, backend) -> None:
    content = chat(app, logprobs=True, max_tokens=3).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(e["top_logprobs"] == [] for e in content)
    assert backend.calls[0][2].logprobs == 1


def test_chat_stream_logprobs_follow_the_text(app, backend, tok) -> None:
    backend.output_ids = tok.encode(REPLY)
    whole = chat(app, logprobs=True, top_logprobs=3).json()["choices"][0]["logprobs"]["content"]
    events = sse_events(chat(app, logprobs=True, top_logprobs=3, stream=True))
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["logprobs"] is None  # the role chunk
    streamed, raw, text = [], b"", ""
    for event in events[1:-1]:
        choice = event["choices"][0]
        entries = choice["logprobs"]["content"]
        if choice["finish_reason"] is None:  # one token per chunk; its text once its bytes are whole
            assert len(entries) == 1
            raw, text = raw + bytes(entries[0]["bytes"]), text + choice["delta"]["content"]
            try:
                assert raw.decode() == text
            except UnicodeDecodeError:  # a character's first bytes: the token waits for the rest
                assert choice["delta"]["content"] == ""
        streamed += entries
    assert streamed == whole and raw.decode() == text == REPLY
    assert any(e["choices"][0]["delta"] == {"content": ""} for e in events[1:-1])  # a split character


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_and_stop_strings(app, tok, stream) -> None:
    prompt = "Hello world! The quick brown fox"
    body = {"prompt": prompt, "logprobs": 2, "stop": ["quick"], "stream": stream}
    response = call(app, "POST", "/v1/completions", json=body)
    if stream:
        choices = [e["choices"][0] for e in sse_events(response)[:-1]]
        keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        logprobs = {k: [v for c in choices for v in c["logprobs"][k]] for k in keys}
        text = "".join(c["text"] for c in choices)
    else:
        choice = response.json()["choices"][0]
        logprobs, text = choice["logprobs"], choice["text"]
    assert text == "Hello world! The "
    ids = tok.encode(prompt)
    n = len(logprobs["tokens"])
    assert logprobs["tokens"] == [tok.decode([t]) for t in ids[:n]]
    assert "".join(logprobs["tokens"]).startswith(text) and n < len(ids)  # nothing past the stop
    assert all(offset < len(text) for offset in logprobs["text_offset"])
    assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(n)]
    assert logprobs["token_logprobs"] == [lp(t)[0] for t in ids[:n]]
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])


def test_completion_multibyte_stream_loses_no_logprobs(app, backend) -> None:
    prompt = "龘龘 🎉🚀 naïve"
    events = sse_events(
        call(app, "POST", "/v1/completions", json={"prompt": prompt, "stream": True, "logprobs": 0})
    )[:-1]
    tokens = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
    assert len(tokens) == backend.sent[backend.calls[0][0]]
    assert all(top == {} for e in events for top in e["choices"][0]["logprobs"]["top_logprobs"])


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ],
)
def test_bad_logprobs_requests(app, backend, path, extra, param) -> None:
    base = {"messages": MESSAGES} if "chat" in path else {"prompt": "hi"}
    error = assert_error(call(app, "POST", path, json={**base, **extra}), 400, param)
    assert error["param"] == param
    assert not backend.calls
