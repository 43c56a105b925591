"""The HTTP front under a real uvicorn server: client disconnects close the backend's stream, and the
official ``openai`` client works end to end (over the echoing backend of ``http_harness``)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.http_harness import MESSAGES, MODEL, serve_in_thread

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def served(app) -> Iterator[str]:
    with serve_in_thread(app) as url:
        yield url


def _wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_client_disconnect_mid_stream_closes_the_backend(served, backend) -> None:
    backend.stall_after = 2  # no more output: only watching the connection can notice the client left
    request = {"prompt": "x", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=served, timeout=10) as client:
        with client.stream("POST", "/v1/completions", json=request) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
    assert _wait_for(lambda: backend.calls and backend.calls[0][0] in backend.closed)
    assert backend.sent[backend.calls[0][0]] == 2


def test_client_disconnect_while_waiting_closes_the_backend(served, backend) -> None:
    backend.stall_after = 2
    request = {"prompt": "x", "max_tokens": 100, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=served, timeout=0.5) as client:
        client.post("/v1/completions", json=request)
    assert _wait_for(lambda: backend.calls and backend.calls[0][0] in backend.closed)
    assert backend.sent[backend.calls[0][0]] == 2


def test_openai_client(served, tok) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    expected = tok.decode(tok.encode_chat(MESSAGES))
    n = len(tok.encode_chat(MESSAGES))
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, seed=1)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (n, n + 1)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, max_tokens=8
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tok.decode(
        tok.encode_chat(MESSAGES)[:8]
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == n + 8
    completion = client.completions.create(model=MODEL, prompt="Hello world!", max_tokens=4, stop=["zz"])
    assert completion.choices[0].text == tok.decode(tok.encode("Hello world!")[:4])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10**6)
