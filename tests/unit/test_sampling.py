"""Sampling: greedy, seeded determinism independent of the batch, filters, penalties."""

from __future__ import annotations

import pytest
import torch

from pdmesh.engine.sampling import SampleInput, apply_penalties, sample
from pdmesh.generation import SamplingParams

pytestmark = pytest.mark.timeout(20)

VOCAB = 50


def _inp(
    seed: int | None = None, out: list[int] | None = None, prompt: list[int] | None = None, **kw
) -> SampleInput:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SampleInput(SamplingParams(**kw), gen, prompt or [1], out or [])


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax() -> None:
    logits = _logits(3)
    tokens, lps = sample(logits, [_inp(temperature=0) for _ in range(3)])
    assert tokens == logits.argmax(-1).tolist()
    assert lps == [None, None, None]


def test_seeded_tokens_do_not_depend_on_the_batch() -> None:
    row = _logits(1, seed=7)
    alone = []
    inp = _inp(seed=123, temperature=1.0)
    for _ in range(20):
        alone.append(sample(row, [inp])[0][0])
    together = []
    inp = _inp(seed=123, temperature=1.0)
    others = [_inp(seed=s, temperature=0.7, top_k=5) for s in range(3)]
    for step in range(20):
        batch = torch.cat([_logits(2, seed=100 + step), row, _logits(1, seed=200 + step)])
        tokens, _ = sample(batch, [others[0], others[1], inp, others[2]])
        together.append(tokens[2])
    assert alone == together
    assert len(set(alone)) > 1  # really random


def test_top_k_top_p_min_p_restrict_support() -> None:
    logits = _logits(1, seed=3)
    order = logits[0].argsort(descending=True).tolist()
    probs = logits[0].softmax(-1)
    for kw, allowed in [
        ({"top_k": 3}, set(order[:3])),
        ({"top_p": float(probs[order[0]] + probs[order[1]]) - 1e-4}, set(order[:2])),
        ({"min_p": float(probs[order[1]] / probs[order[0]]) - 1e-4}, set(order[:2])),
    ]:
        inp = _inp(seed=1, temperature=1.0, **kw)
        seen = {sample(logits, [inp])[0][0] for _ in range(200)}
        assert seen <= allowed, kw
        assert len(seen) == len(allowed), kw


def test_penalties() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    rep = apply_penalties(logits, [SampleInput(SamplingParams(repetition_penalty=2.0), None, [0], [1])])
    assert rep.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    freq = apply_penalties(
        logits,
        [SampleInput(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), None, [3], [2, 2, 0])],
    )
    assert freq.tolist() == [[2.0 - 0.5 - 0.25, -2.0, 1.0 - 1.0 - 0.25, 0.5]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, 0.5]]  # not modified in place


def test_logprobs_of_chosen_token() -> None:
    logits = _logits(1)
    tokens, lps = sample(logits, [_inp(temperature=0, logprobs=3)])
    chosen, top = lps[0]
    ref = torch.log_softmax(logits[0], -1)
    assert chosen == pytest.approx(float(ref[tokens[0]]))
    assert len(top) == 3 and tokens[0] in top


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    from pdmesh.engine.config import EngineConfig
    from pdmesh.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model_dir=tiny_qwen3, num_blocks=64))


def _run(engine, sampling: SamplingParams, prompt: list[int] | None = None, rid: str = "x"):
    from pdmesh.engine.types import EngineRequest

    engine.add_request(EngineRequest(rid, prompt or [5, 6, 7, 8], sampling))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    return [t for o in outs for t in o.token_ids], outs[-1]


def test_stop_ids_eos_ignore_eos_and_max_tokens(engine, monkeypatch) -> None:
    from pdmesh.generation import FinishReason

    base, last = _run(engine, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert len(base) == 12 and last.finish_reason == FinishReason.LENGTH
    stop = base[4]
    cut = base.index(stop) + 1
    toks, last = _run(engine, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]))
    assert toks == base[:cut] and last.finish_reason == FinishReason.STOP
    monkeypatch.setattr(engine.model_config, "eos_token_ids", [stop])
    toks, last = _run(engine, SamplingParams(temperature=0, max_tokens=12))
    assert toks == base[:cut] and last.finish_reason == FinishReason.STOP
    toks, last = _run(engine, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert toks == base and last.finish_reason == FinishReason.LENGTH
    toks, last = _run(engine, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    assert toks == base[:1] and last.finish_reason == FinishReason.LENGTH


def test_seeded_request_in_the_engine_ignores_its_neighbours(engine) -> None:
    from pdmesh.engine.types import EngineRequest

    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=42, max_tokens=10, ignore_eos=True)
    alone, _ = _run(engine, seeded, rid="alone")
    for i in range(3):
        engine.add_request(
            EngineRequest(f"n{i}", [9 + i] * (3 + i), SamplingParams(temperature=1.0, max_tokens=8))
        )
    together, _ = _run(engine, seeded, rid="seeded")
    assert together == alone


def test_logprobs_in_engine_outputs(engine) -> None:
    toks, last = _run(engine, SamplingParams(temperature=0, max_tokens=3, logprobs=2, ignore_eos=True))
    assert last.logprobs is not None and len(last.logprobs) == 1
    chosen, top = last.logprobs[0]
    assert chosen <= 0 and len(top) == 2 and toks[-1] in top
