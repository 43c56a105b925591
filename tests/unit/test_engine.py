"""The engine: continuous batching, preemption, rejection, abort, PREFILL/DECODE hand-over."""

from __future__ import annotations

import random
import threading

import pytest

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.engine_loop import EngineLoop
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import FinishReason, RequestMode, SamplingParams, TokenOutput

pytestmark = pytest.mark.timeout(60)


def make_engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=model_dir, **kw))


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 1000) for _ in range(n)]


def run_all(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list[TokenOutput]]:
    outs: dict[str, list[TokenOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outs
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    raise AssertionError("the engine did not finish")


def tokens_of(outs: list[TokenOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def reference(engine: LLMEngine, p: list[int], sampling: SamplingParams) -> list[int]:
    engine.add_request(EngineRequest("ref", p, sampling))
    return tokens_of(run_all(engine)["ref"])


@pytest.fixture(scope="module")
def engine(tiny_qwen3) -> LLMEngine:
    return make_engine(tiny_qwen3, max_num_seqs=8, max_prefill_batch_size=4, max_prefill_tokens=64)


def test_continuous_batching_many_requests(engine) -> None:
    specs = [(prompt(3 + 7 * i % 40, i), 4 + i % 9) for i in range(20)]
    expected = {f"r{i}": reference(engine, p, greedy(m)) for i, (p, m) in enumerate(specs)}
    outs: dict[str, list[TokenOutput]] = {}
    pending = list(enumerate(specs))
    while pending or engine.has_unfinished():
        for _ in range(3):  # requests keep arriving while others run
            if pending:
                i, (p, m) = pending.pop(0)
                engine.add_request(EngineRequest(f"r{i}", p, greedy(m)))
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    for rid, want in expected.items():
        assert tokens_of(outs[rid]) == want, rid
        assert outs[rid][-1].finished and outs[rid][-1].finish_reason == FinishReason.LENGTH
        assert all(not o.finished for o in outs[rid][:-1])
    assert engine.stats().free_blocks == engine.stats().total_blocks


@pytest.mark.parametrize("workspace_mib", [0, 1])
def test_decode_without_or_in_and_out_of_the_workspace_gives_the_same_tokens(
    tiny_qwen3, engine, workspace_mib
) -> None:
    # 0: attention gathers every step. 1 MiB: the first few sequences fit the workspace, the full
    # batch of 16 at ~200 tokens (16 x 256 slots x 512 B) does not, and as they finish it fits again
    specs = [(prompt(20 + 9 * i, 70 + i), 30 + 5 * (i % 3)) for i in range(16)]
    expected = {f"w{i}": reference(engine, p, greedy(m)) for i, (p, m) in enumerate(specs)}
    other = make_engine(tiny_qwen3, max_num_seqs=16, decode_workspace_mib=workspace_mib)
    outs: dict[str, list[TokenOutput]] = {}
    for i, (p, m) in enumerate(specs):
        other.add_request(EngineRequest(f"w{i}", p, greedy(m)))
        for _ in range(i % 4):  # staggered arrivals
            for out in other.step():
                outs.setdefault(out.request_id, []).append(out)
    for rid, more in run_all(other).items():
        outs.setdefault(rid, []).extend(more)
    assert {rid: tokens_of(o) for rid, o in outs.items()} == expected
    if other.runner.workspace is not None:  # idle again: its memory is given back
        assert all(buffer is None for buffer in other.runner.workspace._buffers)


def test_preemption_under_a_tiny_pool_loses_nothing(tiny_qwen3, engine) -> None:
    specs = [(prompt(9, 50 + i), 20) for i in range(6)]
    expected = [reference(engine, p, greedy(m)) for p, m in specs]
    small = make_engine(tiny_qwen3, block_size=4, num_blocks=16, max_num_seqs=6)
    for i, (p, m) in enumerate(specs):
        small.add_request(EngineRequest(f"s{i}", p, greedy(m)))
    outs = run_all(small)
    assert small.scheduler.num_preemptions > 0
    for i in range(len(specs)):
        assert tokens_of(outs[f"s{i}"]) == expected[i]
    assert small.stats().free_blocks == small.stats().total_blocks == 16


def test_requests_that_can_never_fit_are_rejected(tiny_qwen3, engine) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(EngineRequest("big", prompt(500, 1), greedy(100)))
    small = make_engine(tiny_qwen3, block_size=4, num_blocks=4)
    with pytest.raises(ValueError, match="KV blocks"):
        small.add_request(EngineRequest("big", prompt(10, 1), greedy(10)))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(EngineRequest("e", [], greedy()))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request(EngineRequest("v", [10**6], greedy()))
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request(EngineRequest("p", [1, 2], SamplingParams(top_p=0)))
    assert not engine.has_unfinished()


def test_abort_frees_blocks(engine) -> None:
    total = engine.stats().total_blocks
    engine.add_request(EngineRequest("a", prompt(40, 3), greedy(100)))
    engine.add_request(EngineRequest("b", prompt(5, 4), greedy(3)))
    engine.step()
    engine.step()
    assert engine.stats().free_blocks < total
    assert engine.abort("a") and not engine.abort("nope")
    outs = run_all(engine)
    assert outs["a"][-1].finish_reason == FinishReason.ABORT and outs["a"][-1].finished
    assert outs["b"][-1].finish_reason == FinishReason.LENGTH
    assert engine.stats().free_blocks == total


@pytest.mark.parametrize("prompt_len", [5, 16, 33])
def test_prefill_copy_decode_equals_mixed(tiny_qwen3, engine, prompt_len) -> None:
    p = prompt(prompt_len, prompt_len)
    expected = reference(engine, p, greedy(20))
    a = make_engine(tiny_qwen3, num_blocks=64)
    b = make_engine(tiny_qwen3, num_blocks=64)
    assert a.kv_layout == b.kv_layout and a.kv_layout.mismatch(b.kv_layout) is None
    b.allocate_kv(16 * 8)  # so that b's block ids differ from a's
    a.add_request(EngineRequest("x", p, greedy(20), mode=RequestMode.PREFILL))
    (out,) = run_all(a)["x"]
    assert out.finished and out.finish_reason is None and len(out.token_ids) == 1
    assert len(out.kv_block_ids) == -(-prompt_len // 16)
    dst = b.allocate_kv(prompt_len)
    assert dst is not None and set(dst).isdisjoint(out.kv_block_ids)
    b.kv_pool[dst] = a.kv_pool[out.kv_block_ids]
    a.free_kv(out.kv_block_ids)
    assert a.stats().free_blocks == 64
    req = EngineRequest(
        "x", p, greedy(20), mode=RequestMode.DECODE, first_token=out.token_ids[0], kv_block_ids=dst
    )
    b.add_request(req)
    rest = tokens_of(run_all(b)["x"])
    assert out.token_ids + rest == expected
    assert b.stats().free_blocks == 64 - 8  # only the blocks allocated above remain


def test_prefill_that_ends_at_once_frees_its_blocks(engine) -> None:
    engine.add_request(EngineRequest("one", prompt(20, 9), greedy(1), mode=RequestMode.PREFILL))
    (out,) = run_all(engine)["one"]
    assert out.finish_reason == FinishReason.LENGTH and out.kv_block_ids is None
    assert engine.stats().free_blocks == engine.stats().total_blocks


def test_decode_validation_and_immediate_finish(engine) -> None:
    with pytest.raises(ValueError, match="allocate_kv"):
        engine.add_request(
            EngineRequest("d", [1, 2, 3], greedy(), mode=RequestMode.DECODE, first_token=5, kv_block_ids=[0])
        )
    ids = engine.allocate_kv(3)
    engine.add_request(
        EngineRequest("d", [1, 2, 3], greedy(1), mode=RequestMode.DECODE, first_token=5, kv_block_ids=ids)
    )
    (out,) = run_all(engine)["d"]
    assert out.finished and out.token_ids == [] and out.finish_reason == FinishReason.LENGTH
    assert engine.stats().free_blocks == engine.stats().total_blocks


def test_runner_delivers_outputs_and_survives_a_failing_step(engine, monkeypatch) -> None:
    runner = EngineLoop(engine)
    runner.start()
    try:
        done = threading.Event()
        got: list[TokenOutput] = []

        def on_output(out: TokenOutput) -> None:
            got.append(out)
            if out.finished:
                done.set()

        runner.submit(EngineRequest("r", prompt(6, 1), greedy(5)), on_output)
        assert done.wait(10) and len(tokens_of(got)) == 5
        with pytest.raises(ValueError):
            runner.submit(EngineRequest("bad", [], greedy()), on_output)

        original = engine.runner.run
        monkeypatch.setattr(engine.runner, "run", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        done.clear()
        got.clear()
        runner.submit(EngineRequest("f", prompt(6, 2), greedy(5)), on_output)
        assert done.wait(10)
        assert got[-1].finish_reason == FinishReason.ERROR and "boom" in got[-1].error
        monkeypatch.setattr(engine.runner, "run", original)
        done.clear()
        got.clear()
        runner.submit(EngineRequest("g", prompt(6, 3), greedy(4)), on_output)
        assert done.wait(10) and len(tokens_of(got)) == 4
        assert runner.stats().free_blocks == runner.stats().total_blocks
    finally:
        runner.stop()


def test_prefix_cache_hits_give_the_same_tokens(tiny_qwen3) -> None:
    shared = prompt(40, 77)
    prompts = [shared + [5, 6], shared + [7], shared[:20] + [9, 9, 9]]
    plain = make_engine(tiny_qwen3, enable_prefix_caching=False)
    cached = make_engine(tiny_qwen3)
    expected = [reference(plain, p, greedy(10)) for p in prompts]
    got = [reference(cached, p, greedy(10)) for p in prompts]
    assert got == expected
    stats = cached.stats()
    assert stats.prefix_cache_hit_tokens == 32 + 16  # two full blocks, then one
    assert stats.prefix_cache_query_tokens == sum(len(p) for p in prompts)
    assert stats.free_blocks == stats.total_blocks


def test_two_prefills_pinning_shared_blocks(tiny_qwen3) -> None:
    eng = make_engine(tiny_qwen3, num_blocks=32)
    p = prompt(40, 5)
    outs = []
    for rid in ("p1", "p2"):
        eng.add_request(EngineRequest(rid, p, greedy(5), mode=RequestMode.PREFILL))
        outs += run_all(eng)[rid]
    assert set(outs[0].kv_block_ids[:2]) == set(outs[1].kv_block_ids[:2])  # shared
    eng.free_kv(outs[0].kv_block_ids)
    assert eng.stats().free_blocks < 32
    eng.free_kv(outs[1].kv_block_ids)
    assert eng.stats().free_blocks == 32


def test_running_sequences_step_between_the_chunks_of_a_long_prompt(tiny_qwen3) -> None:
    # no prefix cache: the reference runs must not leave the long prompt's blocks computed
    engine = make_engine(tiny_qwen3, max_num_seqs=4, max_prefill_tokens=16, enable_prefix_caching=False)
    short, long = prompt(5, 1), prompt(70, 2)  # 70 tokens: five chunks of at most 16
    expected = {"short": reference(engine, short, greedy(30)), "long": reference(engine, long, greedy(4))}
    engine.add_request(EngineRequest("short", short, greedy(30)))
    outs: dict[str, list[TokenOutput]] = {}
    for out in engine.step():  # the short prompt's prefill: it is running now
        outs.setdefault(out.request_id, []).append(out)
    engine.add_request(EngineRequest("long", long, greedy(4)))
    kinds = []
    while engine.has_unfinished():
        produced = engine.step()
        kinds.append(engine.last_batches[0][0])
        for out in produced:
            outs.setdefault(out.request_id, []).append(out)
    # prefill chunks and decode steps alternate until the long prompt's last chunk
    assert kinds[:9] == [True, False, True, False, True, False, True, False, True]
    assert {rid: tokens_of(o) for rid, o in outs.items()} == expected
