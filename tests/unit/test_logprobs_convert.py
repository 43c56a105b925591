"""Logprobs on their way out: protobuf conversions, the worker's messages, the text stream's
bookkeeping and the two OpenAI renderings."""

from __future__ import annotations

import asyncio
import math

import pytest

from pdmesh.engine.types import EngineRequest
from pdmesh.generation import SamplingParams, TokenOutput
from pdmesh.rpc.convert import logprobs_from_proto, logprobs_to_proto
from pdmesh.tokenizer import Tokenizer
from pdmesh.v1 import worker_pb2
from services.coordinator import logprobs
from services.coordinator.backend import GenerationChunk
from services.coordinator.text_stream import TextStream, TokenEntry
from services.worker.bridge import EngineBridge
from services.worker.servicer import _chunk
from tests.unit.test_tokenizer import build_tokenizer_dir

pytestmark = pytest.mark.timeout(60)

# float32-exact values, so that they survive protobuf's float unchanged
ENTRIES = [(-0.25, {7: -0.25, 3: -1.5, 9: -4.0}), (-2.0, {5: -0.5, 11: -2.0})]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(build_tokenizer_dir(tmp_path_factory.mktemp("chatml")))


def test_proto_round_trip_keeps_values_and_order() -> None:
    messages = logprobs_to_proto(ENTRIES)
    assert [m.logprob for m in messages] == [-0.25, -2.0]
    assert [t.token_id for t in messages[0].top] == [7, 3, 9]
    back = logprobs_from_proto(worker_pb2.DecodeChunk(token_ids=[7, 11], logprobs=messages).logprobs)
    assert back == ENTRIES
    assert [list(top) for _, top in back] == [[7, 3, 9], [5, 11]]  # most likely first, as sent


def test_proto_without_logprobs() -> None:
    assert logprobs_to_proto(None) == [] and logprobs_to_proto([]) == []
    assert logprobs_from_proto(worker_pb2.DecodeChunk(token_ids=[1]).logprobs) is None


def test_worker_chunk_carries_one_entry_per_token() -> None:
    chunk = _chunk(TokenOutput("r", [7, 11], logprobs=ENTRIES))
    assert list(chunk.token_ids) == [7, 11] and logprobs_from_proto(chunk.logprobs) == ENTRIES
    assert not _chunk(TokenOutput("r", [7])).logprobs


class _ListRunner:
    """An engine runner that answers every request at once with fixed outputs."""

    def __init__(self, outputs: list[TokenOutput]) -> None:
        self.outputs = outputs

    def submit(self, request, on_output) -> None:
        for output in self.outputs:
            on_output(output)

    def abort(self, request_id: str) -> bool:
        return False


def test_run_to_end_merges_logprobs() -> None:
    outputs = [
        TokenOutput("r", [7], logprobs=ENTRIES[:1]),
        TokenOutput("r", [11], finished=True, logprobs=ENTRIES[1:]),
    ]
    request = EngineRequest("r", [1, 2], SamplingParams(logprobs=3))
    merged = asyncio.run(EngineBridge(_ListRunner(outputs)).run_to_end(request))
    assert merged.token_ids == [7, 11] and merged.logprobs == ENTRIES
    plain = asyncio.run(EngineBridge(_ListRunner([TokenOutput("r", [7], True)])).run_to_end(request))
    assert plain.logprobs is None


def _lp(token: int) -> tuple[float, dict[int, float]]:
    return (-token / 100, {token: -token / 100, token + 1: -1.0 - token / 100})


def _feed_one_by_one(stream: TextStream, ids: list[int], eos: int | None = None) -> list[tuple[str, list]]:
    """(text, logprob entries) after each token; the last chunk finishes the request."""
    out = []
    all_ids = ids + ([eos] if eos is not None else [])
    for i, t in enumerate(all_ids):
        last = i == len(all_ids) - 1
        chunk = GenerationChunk(
            [t], last, ("stop" if eos is not None else "length") if last else None, [_lp(t)]
        )
        text = stream.feed(chunk)
        out.append((text, stream.take_logprobs() if text or stream.done else []))
        if stream.done:
            break
    return out


def test_text_stream_hands_out_each_token_once_with_its_offset(tok) -> None:
    ids = tok.encode("Hello world! The quick brown fox")
    eos = tok.token_to_id("<|im_end|>")
    steps = _feed_one_by_one(TextStream(tok, drop_ids=[eos]), ids, eos)
    entries = [e for _, es in steps for e in es]
    assert [e.token_id for e in entries] == ids + [eos]  # the dropped end token too
    assert [e.logprobs for e in entries] == [_lp(t) for t in ids + [eos]]
    texts = [tok.decode([t]) for t in ids]
    assert [e.offset for e in entries[:-1]] == [len("".join(texts[:i])) for i in range(len(ids))]
    assert entries[-1].offset == len("".join(texts))


def test_text_stream_holds_logprobs_with_held_text(tok) -> None:
    ids = tok.encode("龘龘 🎉 naïve")
    steps = _feed_one_by_one(TextStream(tok), ids)
    assert [e.token_id for _, es in steps for e in es] == ids
    for text, entries in steps:  # a chunk's entries are the tokens whose text it carries
        assert bytes(b for e in entries for b in logprobs.TokenTexts(tok).get(e.token_id)[1]) == text.encode()


def test_text_stream_drops_tokens_past_a_stop_string(tok) -> None:
    ids = tok.encode("Hello world! The quick brown fox")
    stream = TextStream(tok, stops=["quick"])
    text = stream.feed(GenerationChunk(ids, logprobs=[_lp(t) for t in ids]))  # past the stop at once
    entries = stream.take_logprobs()
    assert text == "Hello world! The " and stream.finish_reason == "stop"
    assert entries and all(e.offset < len(text) for e in entries)
    rendered = "".join(tok.decode([e.token_id]) for e in entries)
    assert rendered.startswith(text) and "brown" not in rendered  # " quick" straddles the cut: kept
    assert [e.token_id for e in entries] == ids[: len(entries)] and len(entries) < len(ids)
    assert stream.take_logprobs() == []


def test_text_stream_skips_tokens_without_logprobs(tok) -> None:
    stream = TextStream(tok)
    stream.feed(GenerationChunk(tok.encode("Hello"), True, "length"))
    assert stream.take_logprobs() == []


def test_token_texts_bytes(tok) -> None:
    texts = logprobs.TokenTexts(tok)
    ids = tok.encode("龘 café")
    assert b"".join(bytes(texts.get(t)[1]) for t in ids).decode() == "龘 café"
    partial = [t for t in ids if "\ufffd" in texts.get(t)[0]]
    assert partial  # byte-level BPE splits the rare character: its tokens carry their raw bytes
    assert all(bytes(texts.get(t)[1]) != "\ufffd".encode() for t in partial)
    eos = tok.token_to_id("<|im_end|>")
    assert texts.get(eos) == ("<|im_end|>", list(b"<|im_end|>"))


def test_render_chat_trims_top_and_floors_infinity(tok) -> None:
    a, b = tok.encode("Hello")[0], tok.encode(" world")[0]
    entries = [
        TokenEntry(a, 0, (-0.5, {a: -0.5, b: -1.0})),
        TokenEntry(b, 5, (-math.inf, {a: -0.1, b: -math.inf})),
    ]
    texts = logprobs.TokenTexts(tok)
    out = logprobs.render(texts, entries, 1, chat=True)
    first = out["content"][0]
    assert first == {
        "token": tok.decode([a]),
        "logprob": -0.5,
        "bytes": list(tok.decode([a]).encode()),
        "top_logprobs": [
            {"token": tok.decode([a]), "logprob": -0.5, "bytes": list(tok.decode([a]).encode())}
        ],
    }
    assert out["content"][1]["logprob"] == logprobs.FLOOR
    assert logprobs.render(texts, entries, 0, chat=True)["content"][0]["top_logprobs"] == []
    assert logprobs.render(texts, entries, None, chat=True) is None
    assert logprobs.render(texts, [], 3, chat=True) == {"content": []}


def test_render_completion(tok) -> None:
    a, b = tok.encode("Hello")[0], tok.encode(" world")[0]
    entries = [TokenEntry(a, 0, (-0.5, {a: -0.5, b: -1.0})), TokenEntry(b, 5, (-1.0, {a: -0.1, b: -1.0}))]
    out = logprobs.render(logprobs.TokenTexts(tok), entries, 2, chat=False)
    sa, sb = tok.decode([a]), tok.decode([b])
    assert out == {
        "tokens": [sa, sb],
        "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{sa: -0.5, sb: -1.0}, {sa: -0.1, sb: -1.0}],
        "text_offset": [0, 5],
    }
    assert logprobs.render(logprobs.TokenTexts(tok), entries, 0, chat=False)["top_logprobs"] == [{}, {}]
