"""The engine loop never makes other threads wait for a step: submit, abort, free and stats answer
while a step runs, an abort lands at the next step boundary, and no block leaks when a caller leaves.

A step is held open on an event (the model runner's ``run`` waits for it) so that "during a step" is a
condition the test controls, not a race against the clock.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.engine_loop import EngineLoop
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import FinishReason, RequestMode, SamplingParams, TokenOutput
from services.worker.bridge import EngineBridge

pytestmark = pytest.mark.timeout(60)

CALL_S = 5.0  # a call that waited for the held step would not return before it is released


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


class HeldSteps:
    """Wraps the model runner's ``run`` so that a step starts, signals, and waits to be released."""

    def __init__(self, engine: LLMEngine) -> None:
        self.inner = engine.runner.run
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.batches: list[list[str]] = []
        engine.runner.run = self

    def hold(self) -> None:
        self.started.clear()
        self.release.clear()

    def __call__(self, seqs, *args, **kwargs):
        self.batches.append([s.request_id for s in seqs])
        self.started.set()
        assert self.release.wait(30), "the test never released the held step"
        return self.inner(seqs, *args, **kwargs)


class Outputs:
    """Collects outputs per request; ``wait_finished`` blocks until a request's last output."""

    def __init__(self) -> None:
        self.by_id: dict[str, list[TokenOutput]] = {}
        self._cond = threading.Condition()

    def __call__(self, out: TokenOutput) -> None:
        with self._cond:
            self.by_id.setdefault(out.request_id, []).append(out)
            self._cond.notify_all()

    def wait_finished(self, request_id: str, timeout: float = 30.0) -> TokenOutput:
        with self._cond:
            done = self._cond.wait_for(
                lambda: any(o.finished for o in self.by_id.get(request_id, [])), timeout
            )
        assert done, f"{request_id} did not finish"
        return self.by_id[request_id][-1]


@pytest.fixture
def runner(tiny_qwen3) -> Iterator[tuple[EngineLoop, HeldSteps]]:
    engine = LLMEngine(EngineConfig(model_dir=tiny_qwen3, num_blocks=64, max_prefill_batch_size=1))
    held = HeldSteps(engine)
    runner = EngineLoop(engine)
    runner.start()
    try:
        yield runner, held
    finally:
        held.release.set()
        runner.stop()


def in_thread(fn, *args):
    """Runs ``fn`` on another thread and returns its result, failing if it does not return promptly."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    thread.join(CALL_S)
    assert not thread.is_alive(), f"{fn.__name__} waited for the running step"
    return result[0]


def test_calls_do_not_wait_for_a_running_step_and_abort_lands_at_the_boundary(runner) -> None:
    runner, held = runner
    outputs = Outputs()
    held.hold()
    runner.submit(EngineRequest("long", [5] * 40, greedy(3)), outputs)
    assert held.started.wait(CALL_S)  # the step of "long" is running and held

    in_thread(runner.submit, EngineRequest("queued", [6] * 8, greedy(3)), outputs)
    stats = in_thread(runner.stats)
    assert stats.waiting >= 1  # a submitted request counts as waiting before the engine takes it
    assert in_thread(runner.abort, "queued") is True
    assert in_thread(runner.abort, "nobody") is False

    held.release.set()
    aborted = outputs.wait_finished("queued")
    assert aborted.finish_reason == FinishReason.ABORT and aborted.token_ids == []
    assert all("queued" not in batch for batch in held.batches)  # never ran: cancelled at the boundary
    outputs.wait_finished("long")
    assert sum(len(o.token_ids) for o in outputs.by_id["long"]) == 3
    wait_idle(runner)


def test_a_refused_decode_request_ends_with_an_error_and_frees_its_blocks(runner) -> None:
    runner, _ = runner
    outputs = Outputs()
    block_ids = asyncio.run(runner.allocate_kv(20))
    assert block_ids
    request = EngineRequest(
        "d", [5] * 20, greedy(4), mode=RequestMode.DECODE, first_token=7, kv_block_ids=block_ids
    )
    runner.submit(request, outputs)
    # the same blocks handed over a second time are no longer the caller's: refused on the engine thread
    runner.submit(EngineRequest("d2", [5] * 20, greedy(4), mode=RequestMode.DECODE, first_token=7,
                                kv_block_ids=block_ids), outputs)  # fmt: skip
    refused = outputs.wait_finished("d2")
    assert refused.finish_reason == FinishReason.ERROR and "allocate_kv" in refused.error
    assert outputs.wait_finished("d").finish_reason == FinishReason.LENGTH
    wait_idle(runner)


def test_allocation_abandoned_by_its_caller_is_given_back(runner) -> None:
    runner, held = runner
    outputs = Outputs()
    held.hold()
    runner.submit(EngineRequest("busy", [5] * 16, greedy(2)), outputs)
    assert held.started.wait(CALL_S)

    async def allocate_then_give_up() -> None:
        task = asyncio.ensure_future(runner.allocate_kv(32))
        await asyncio.sleep(0)  # the command is queued behind the held step
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(allocate_then_give_up())
    held.release.set()
    outputs.wait_finished("busy")
    wait_idle(runner)


def test_a_prefill_that_finishes_after_its_caller_left_frees_its_pinned_blocks(runner) -> None:
    runner, held = runner
    bridge = EngineBridge(runner)
    held.hold()

    async def leave_during_the_prefill() -> None:
        request = EngineRequest("p", [5] * 40, greedy(8), mode=RequestMode.PREFILL)  # pins its KV
        task = asyncio.ensure_future(bridge.run_to_end(request))
        while not held.started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()  # the caller leaves while its prefill step runs
        with pytest.raises(asyncio.CancelledError):
            await task
        held.release.set()  # the step finishes and pins blocks for a caller who is gone
        # the loop must run on: the output reaches the bridge through it
        while not idle(runner):
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(leave_during_the_prefill(), 10))


def idle(runner: EngineLoop) -> bool:
    stats = runner.stats()
    return stats.free_blocks == stats.total_blocks and stats.running == 0 and stats.waiting == 0


def wait_idle(runner: EngineLoop, timeout: float = 10.0) -> None:
    """Waits until every block is free (the last commands apply at the next loop turn)."""
    deadline = time.monotonic() + timeout
    while not idle(runner):
        assert time.monotonic() < deadline, f"blocks not all free: {runner.stats()}"
        time.sleep(0.01)
