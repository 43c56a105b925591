"""pdmesh.bench.request: which server-sent events count as tokens for TTFT and inter-token latency."""

from __future__ import annotations

import pytest

from pdmesh.bench.datasets import SampleRequest
from pdmesh.bench.request import RequestContext, _Stream


def _run(events: list[dict], chat: bool):
    stream = _Stream(RequestContext("http://x", {}, chat, None, None), start=0.0)
    for i, event in enumerate(events, start=1):
        stream.feed(event, float(i))
    stream.done = True
    return stream.output(SampleRequest("p", 3, 4), end=float(len(events) + 1))


def _chat(delta: dict, reason: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}


def test_chat_counts_each_token_event_even_with_empty_text():
    events = [
        _chat({"role": "assistant", "content": ""}),  # t=1: no token yet
        _chat({"content": ""}),  # t=2: a token whose character is not whole yet
        _chat({"content": "🎉"}),  # t=3
        _chat({"content": " ok"}),  # t=4
        _chat({}, "stop"),  # t=5: OpenAI's closing event, no token
    ]
    out = _run(events, chat=True)
    assert out.ttft == pytest.approx(2.0) and out.itl == pytest.approx([1.0, 1.0])
    assert out.generated_text == "🎉 ok" and out.output_tokens == 3


def test_completion_last_token_may_carry_the_finish_reason():
    events = [
        {"choices": [{"text": t, "finish_reason": r}]} for t, r in [("a", None), ("", None), ("b", "length")]
    ]
    out = _run(events, chat=False)
    assert out.ttft == pytest.approx(1.0) and out.itl == pytest.approx([1.0, 1.0]) and out.output_tokens == 3
