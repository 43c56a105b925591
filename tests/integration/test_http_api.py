"""The coordinator's OpenAI-compatible HTTP front over an echoing test backend.

``EchoBackend`` (``http_harness``) stands in for the worker mesh; the fixtures are in this directory's
``conftest.py``; the tests under a real server are in ``test_http_served.py``.
"""

from __future__ import annotations

import logging

import pytest

from pdmesh.errors import ErrorKind
from services.coordinator.backend import GenerationChunk, GenerationError
from services.coordinator.limits import DEFAULT_MAX_TOKENS
from services.coordinator.text_stream import TextStream
from tests.integration.http_harness import MAX_MODEL_LEN, MESSAGES, MODEL, assert_error, call, sse_events

pytestmark = pytest.mark.timeout(60)


# -- happy paths ---------------------------------------------------------------------------------------


def test_models_and_health(app, backend) -> None:
    body = call(app, "GET", "/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL]
    assert call(app, "GET", "/health").status_code == 200
    backend.is_ready = False
    assert call(app, "GET", "/health").status_code == 503
    assert_error(call(app, "POST", "/v1/completions", json={"prompt": "hi"}), 503)


def test_completion_echoes_the_prompt(app, backend, tok) -> None:
    prompt = "Hello world! 你好"
    n = len(tok.encode(prompt))
    body = call(
        app, "POST", "/v1/completions", json={"model": MODEL, "prompt": prompt, "temperature": 0}
    ).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    assert isinstance(body["created"], int)
    choice = {"index": 0, "text": prompt, "logprobs": None, "finish_reason": "stop", "prompt_logprobs": None}
    assert body["choices"] == [choice]  # prompt_logprobs: vLLM's extra, null unless asked
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": n + 1, "total_tokens": 2 * n + 1}
    request_id, prompt_ids, sampling = backend.calls[0]
    assert request_id == body["id"] and prompt_ids == tok.encode(prompt)
    assert sampling.temperature == 0 and sampling.max_tokens == min(DEFAULT_MAX_TOKENS, MAX_MODEL_LEN - n)
    assert request_id in backend.closed


def test_completion_token_ids_and_length_limit(app, backend, tok) -> None:
    ids = tok.encode("The quick brown fox jumps")
    body = call(app, "POST", "/v1/completions", json={"prompt": ids, "max_tokens": 3}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == tok.decode(ids[:3])
    assert body["usage"]["completion_tokens"] == 3
    body = call(app, "POST", "/v1/completions", json={"prompt": [ids], "max_tokens": 2}).json()
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 2, "total_tokens": len(ids) + 2}


def test_sampling_parameters_reach_the_backend(app, backend) -> None:
    request = {
        "prompt": "hi",
        "max_tokens": 5,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "stop_token_ids": [5],
        "logprobs": 2,
        "user": "ignored",
    }
    assert call(app, "POST", "/v1/completions", json=request).status_code == 200
    s = backend.calls[0][2]
    assert (s.temperature, s.top_p, s.seed, s.top_k, s.min_p, s.repetition_penalty) == (
        0.7,
        0.9,
        7,
        40,
        0.05,
        1.1,
    )
    assert (s.presence_penalty, s.frequency_penalty, s.ignore_eos, s.stop_token_ids, s.logprobs) == (
        0.5,
        -0.5,
        True,
        [5],
        2,
    )
    call(
        app,
        "POST",
        "/v1/chat/completions",
        json={"messages": MESSAGES, "max_completion_tokens": 4, "logprobs": True},
    )
    s = backend.calls[1][2]
    assert (s.max_tokens, s.logprobs, s.temperature, s.top_k) == (4, 1, 1.0, -1)


def test_chat_completion(app, backend, tok) -> None:
    body = call(app, "POST", "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}).json()
    prompt_ids = tok.encode_chat(MESSAGES)
    assert backend.calls[0][1] == prompt_ids
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": tok.decode(prompt_ids),
        "tool_calls": [],
    }  # as vLLM
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    n = len(prompt_ids)
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": n + 1, "total_tokens": 2 * n + 1}


def test_chat_content_parts(app, backend, tok) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}
    ]
    assert call(app, "POST", "/v1/chat/completions", json={"messages": messages}).status_code == 200
    assert backend.calls[0][1] == tok.encode_chat([{"role": "user", "content": "hi there"}])
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_error(call(app, "POST", "/v1/chat/completions", json={"messages": image}), 400, "text")


def _stream_chat(app, **extra) -> list:
    response = call(app, "POST", "/v1/chat/completions", json={"messages": MESSAGES, "stream": True, **extra})
    assert response.status_code == 200, response.text
    return sse_events(response)


def test_chat_stream_shape(app, backend, tok) -> None:
    backend.chunk_size = 2
    events = _stream_chat(app)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == tok.decode(tok.encode_chat(MESSAGES))
    assert not any("\ufffd" in c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_stream_include_usage(app, tok) -> None:
    events = _stream_chat(app, stream_options={"include_usage": True}, max_tokens=5)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    n = len(tok.encode_chat(MESSAGES))
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": n, "completion_tokens": 5, "total_tokens": n + 5}
    assert all(e["usage"] is None for e in events[:-2])
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_completion_stream_multibyte(app, backend) -> None:
    prompt = "龘龘 🎉🚀 naïve"
    response = call(app, "POST", "/v1/completions", json={"prompt": prompt, "stream": True})
    events = sse_events(response)
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == prompt and not any("\ufffd" in t for t in texts)
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_one_chunk_per_token(app, backend, path) -> None:
    backend.chunk_size = 3  # the backend hands over 3 tokens at a time: the stream still sends 3 chunks
    body = {"max_tokens": 7, "ignore_eos": True, "stream": True}
    body.update({"messages": MESSAGES} if "chat" in path else {"prompt": "Hello world! The quick brown fox"})
    events = sse_events(call(app, "POST", path, json=body))
    assert events[-1] == "[DONE]"
    chunks = events[1:-1] if "chat" in path else events[:-1]  # chat: after the role chunk
    assert len(chunks) == 7 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stream_split_character_is_an_empty_chunk_then_the_character(app, backend, tok) -> None:
    ids = tok.encode("🎉")
    assert len(ids) > 1  # byte-level pieces: the character is whole only at its last token
    backend.chunk_size = len(ids)
    events = sse_events(call(app, "POST", "/v1/completions", json={"prompt": ids, "stream": True}))
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert texts == [""] * (len(ids) - 1) + ["🎉", ""]  # then the end-of-sequence token's chunk
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    chat = {"messages": MESSAGES, "max_tokens": len(ids), "stream": True}
    backend.output_ids = ids
    deltas = [
        e["choices"][0]["delta"]
        for e in sse_events(call(app, "POST", "/v1/chat/completions", json=chat))[1:-1]
    ]
    assert deltas == [{"content": ""}] * (len(ids) - 1) + [{"content": "🎉"}]


def test_stream_holds_possible_stop_strings_in_empty_chunks(app, backend, tok) -> None:
    prompt = "Hello world! The quick brown fox"
    backend.chunk_size = 4
    body = {"prompt": prompt, "stop": ["Hello world!!", "brown"], "stream": True}
    events = sse_events(call(app, "POST", "/v1/completions", json=body))[:-1]
    texts = [e["choices"][0]["text"] for e in events]
    ids = tok.encode(prompt)
    assert "".join(texts) == "Hello world! The quick " and events[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(texts) == len(tok.encode("Hello world! The quick brown"))  # a chunk per token up to the stop
    held = len(tok.encode("Hello world!"))  # these tokens' text may begin "Hello world!!": it waits
    assert texts[:held] == [""] * held and texts[held].startswith("Hello world! ")
    assert len(ids) > len(texts)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(app, backend, stream) -> None:
    backend.chunk_size = 1
    prompt = "Hello world! The quick brown fox"
    body = {"prompt": prompt, "stop": ["quick", "zzz"], "stream": stream}
    response = call(app, "POST", "/v1/completions", json=body)
    if stream:
        events = sse_events(response)[:-1]
        text = "".join(e["choices"][0]["text"] for e in events)
        reason = events[-1]["choices"][0]["finish_reason"]
    else:
        text, reason = response.json()["choices"][0]["text"], response.json()["choices"][0]["finish_reason"]
    assert (text, reason) == ("Hello world! The ", "stop")
    request_id = backend.calls[0][0]
    assert request_id in backend.closed
    assert backend.sent[request_id] < len(backend.calls[0][1])  # it stopped generating early


def test_stop_token_ids_are_not_rendered(app, backend, tok) -> None:
    ids = tok.encode("Hello world! The quick")
    body = call(app, "POST", "/v1/completions", json={"prompt": ids, "stop_token_ids": [ids[2]]}).json()
    assert body["choices"][0] == {
        "index": 0,
        "text": tok.decode(ids[:2]),
        "logprobs": None,
        "finish_reason": "stop",
        "prompt_logprobs": None,
    }
    assert body["usage"]["completion_tokens"] == 3


# -- errors --------------------------------------------------------------------------------------------


def test_bad_requests(app) -> None:
    post = lambda path, **kw: call(app, "POST", path, **kw)  # noqa: E731
    assert_error(
        post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "json",
    )
    assert_error(post("/v1/chat/completions", json={"model": MODEL}), 400, "messages")
    assert_error(post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    error = assert_error(
        post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "gpt-4", "model_not_found"
    )
    assert error["param"] == "model"
    for bad in (0, -1):
        assert_error(post("/v1/completions", json={"prompt": "x", "max_tokens": bad}), 400, "max_tokens")
    error = assert_error(
        post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}), 400, "max_tokens"
    )
    assert error["type"] == "invalid_request_error" and error["param"] == "max_tokens"
    assert_error(
        post("/v1/completions", json={"prompt": "x", "temperature": -1}), 400, "temperature must be >= 0"
    )
    assert_error(post("/v1/completions", json={"prompt": "x", "top_p": 2}), 400, "top_p")
    assert_error(post("/v1/completions", json={"prompt": "x", "n": 0}), 400, "n")
    assert_error(post("/v1/completions", json={"prompt": [["a"], "b"]}), 400, "prompt")
    assert_error(post("/v1/completions", json={"prompt": [10**9]}), 400, "token ids")
    assert_error(post("/v1/completions", json={"prompt": ""}), 400, "empty")
    assert_error(
        post("/v1/completions", json={"prompt": "x", "stream_options": {"include_usage": True}}), 400
    )
    assert_error(call(app, "GET", "/v1/nothing"), 404)


def test_context_length(app, tok) -> None:
    long_ids = [tok.token_to_id("a")] * MAX_MODEL_LEN
    error = assert_error(
        call(app, "POST", "/v1/completions", json={"prompt": long_ids}), 400, str(MAX_MODEL_LEN)
    )
    assert error["code"] == "context_length_exceeded"
    request = {"prompt": long_ids[:100], "max_tokens": MAX_MODEL_LEN - 99}
    assert_error(
        call(app, "POST", "/v1/completions", json=request), 400, f"context length is {MAX_MODEL_LEN}"
    )
    request["max_tokens"] = MAX_MODEL_LEN - 100
    assert call(app, "POST", "/v1/completions", json=request).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_backend_errors_keep_their_status(app, backend, stream) -> None:
    backend.fail_before = GenerationError("queue full", ErrorKind.OVERLOADED)
    response = call(app, "POST", "/v1/chat/completions", json={"messages": MESSAGES, "stream": stream})
    error = assert_error(response, 429, "queue full")
    assert error["type"] == "rate_limit_error"
    assert backend.calls[0][0] in backend.closed


def test_error_mid_stream_is_an_event(app, backend) -> None:
    backend.fail_after = (3, GenerationError("decode instance died", ErrorKind.UPSTREAM_FAILED))
    events = _stream_chat(app)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["message"] == "decode instance died"
    assert backend.calls[0][0] in backend.closed


def test_request_ids(app, caplog) -> None:
    caplog.set_level(logging.INFO, logger="services.coordinator.http_app")
    response = call(
        app, "POST", "/v1/completions", json={"prompt": "hi"}, headers={"X-Request-Id": "abc-123"}
    )
    assert response.headers["x-request-id"] == "abc-123"
    lines = [r.getMessage() for r in caplog.records if r.name == "services.coordinator.http_app"]
    assert lines and all(line.startswith("[abc-123]") for line in lines)
    generated = call(app, "GET", "/health").headers["x-request-id"]
    assert generated and generated != "abc-123"
    assert call(app, "GET", "/v1/nothing").headers["x-request-id"]


def test_text_stream_holds_back_possible_stop_strings(tok) -> None:
    ids = tok.encode("ab 龘龘X tail")
    stream = TextStream(tok, stops=["龘X"])
    released = [stream.feed(GenerationChunk([t])) for t in ids]
    assert "".join(released) == "ab 龘" and stream.done and stream.finish_reason == "stop"
    assert all("\ufffd" not in r for r in released)
    stream = TextStream(tok, stops=["wor", "world peace"])
    ids = tok.encode("Hello wo")
    released = [
        stream.feed(GenerationChunk([t], finished=i == len(ids) - 1, finish_reason="length"))
        for i, t in enumerate(ids)
    ]
    assert (
        released[-1].endswith("wo") and "".join(released) == "Hello wo" and stream.finish_reason == "length"
    )
