"""``EngineLoop``: drives an ``LLMEngine`` on a daemon thread and calls back with each output.

Only the engine thread touches the engine. Other threads (the worker's event loop) never wait for a
step: ``submit``, ``abort`` and ``free_kv`` queue a command that the loop applies at the next step
boundary, ``allocate_kv`` queues one and awaits its answer, and ``stats`` reads a snapshot the loop
publishes after every step. A long prefill therefore delays no heartbeat, health answer or stream
(the shape of vLLM v1's engine core: inputs and outputs cross a queue, never the engine's lock).

A failing step fails the requests it held (FinishReason.ERROR) and the loop goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest, EngineStats
from pdmesh.generation import FinishReason, RequestMode, TokenOutput
from pdmesh.kv.types import KVLayout

log = logging.getLogger(__name__)

OutputCallback = Callable[[TokenOutput], None]
# After each step that ran, on the engine thread: its batches as (is_prefill, size), its wall time
# and the stats published after it (what the worker's metrics record).
StepObserver = Callable[[list[tuple[bool, int]], float, EngineStats], None]
# A command runs on the engine thread; its future (if any) gets the result.
Command = tuple[Callable[[], Any], Future | None]

BLOCKED_WAIT_S = 0.01  # work exists but nothing can run (e.g. waiting for blocks): do not spin


class EngineLoop:
    """The engine loop on its own thread, fed through a command queue."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        # guards the queue, the callbacks and the flags below; never held while a step runs
        self._cond = threading.Condition()
        self._commands: deque[Command] = deque()
        self._callbacks: dict[str, OutputCallback] = {}
        self._queued_adds = 0  # submitted, not yet in a published snapshot (counted as waiting)
        self._applied_adds = 0  # engine thread: added since the last snapshot
        self._stats = engine.stats()
        self._has_work = False
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.on_step: StepObserver | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="pdmesh-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            left, self._commands = list(self._commands), deque()
        for _, future in left:
            if future is not None:
                future.cancel()

    # -- what other threads call -------------------------------------------------------------------

    def submit(self, request: EngineRequest, on_output: OutputCallback) -> None:
        """Queues ``request``; raises ValueError at once when it is malformed or can never fit."""
        self.engine.check_request(request)
        with self._cond:
            if request.request_id in self._callbacks:
                raise ValueError(f"request id {request.request_id!r} is already in the engine")
            self._callbacks[request.request_id] = on_output
            self._queued_adds += 1
            self._enqueue(lambda: self._add(request))

    def abort(self, request_id: str) -> bool:
        """Cancels a request at the next step boundary; False when no such request is running here."""
        with self._cond:
            if request_id not in self._callbacks:
                return False
            self._enqueue(lambda: self.engine.abort(request_id))
            return True

    async def allocate_kv(self, num_tokens: int) -> list[int] | None:
        """Blocks for a KV transfer, owned by the caller (None when too few are free).

        A caller cancelled while waiting gets nothing and leaks nothing: blocks allocated after it
        left are given back.
        """
        future: Future = Future()
        with self._cond:
            self._enqueue(lambda: self.engine.allocate_kv(num_tokens), future)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._free_unclaimed)
            raise

    def free_kv(self, block_ids: list[int]) -> None:
        """Gives back caller-owned blocks (applied at the next step boundary)."""
        with self._cond:
            self._enqueue(lambda: self.engine.free_kv(block_ids))

    def stats(self) -> EngineStats:
        """The load after the last step (never waits for a running step)."""
        with self._cond:
            return dataclasses.replace(self._stats, waiting=self._stats.waiting + self._queued_adds)

    @property
    def kv_pool(self) -> torch.Tensor:
        return self.engine.kv_pool

    @property
    def kv_layout(self) -> KVLayout:
        return self.engine.kv_layout

    @property
    def eos_token_ids(self) -> list[int]:
        return self.engine.eos_token_ids

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    # -- the engine thread -------------------------------------------------------------------------

    def _enqueue(self, fn: Callable[[], Any], future: Future | None = None) -> None:
        """Appends a command (the caller holds ``_cond``) and wakes the loop."""
        self._commands.append((fn, future))
        self._cond.notify_all()

    def _free_unclaimed(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is None and future.result():
            self.free_kv(future.result())

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._commands and not self._has_work:
                    self._cond.wait()
                if self._stopping:
                    return
                commands, self._commands = list(self._commands), deque()
            for command in commands:
                self._run_command(command)
            if commands:  # what a step is about to run shows as load while it runs
                self._publish_stats()
            stepping = self.engine.has_unfinished()
            started, started_ns = time.perf_counter(), time.time_ns()
            outputs = self._step() if stepping else []
            for out in outputs:
                out.step_started_ns = started_ns  # traces split a request's queue time from its compute
            seconds = time.perf_counter() - started
            self._has_work = self.engine.has_unfinished()
            blocked = self._has_work and not self.engine.ran_batch and not outputs
            self._publish_stats()
            if stepping and self.engine.ran_batch:
                self._observe_step(seconds)
            for callback, out in self._take_callbacks(outputs):
                self._deliver(callback, out)
            if blocked:
                with self._cond:
                    if not self._commands and not self._stopping:
                        self._cond.wait(BLOCKED_WAIT_S)

    def _observe_step(self, seconds: float) -> None:
        if self.on_step is None:
            return
        try:
            self.on_step(list(getattr(self.engine, "last_batches", [])), seconds, self._stats)
        except Exception:  # noqa: BLE001 - metrics must never stop the engine
            log.exception("the step observer failed")

    def _run_command(self, command: Command) -> None:
        fn, future = command
        if future is not None and not future.set_running_or_notify_cancel():
            return  # its caller went away before it ran
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - a bad command must not stop the engine
            if future is None:
                log.exception("engine command failed")
            else:
                future.set_exception(exc)
            return
        if future is not None:
            future.set_result(result)

    def _add(self, request: EngineRequest) -> None:
        """Adds a submitted request; one the engine refuses now ends at once with an error."""
        self._applied_adds += 1
        try:
            self.engine.add_request(request)
        except ValueError as exc:
            log.warning("[%s] refused by the engine: %s", request.request_id, exc)
            if request.mode == RequestMode.DECODE and request.kv_block_ids:
                self.engine.free_kv(request.kv_block_ids)  # they were handed over with the request
            out = TokenOutput(request.request_id, [], True, FinishReason.ERROR, error=str(exc))
            with self._cond:
                callback = self._callbacks.pop(request.request_id, None)
            self._deliver(callback, out)

    def _step(self) -> list[TokenOutput]:
        try:
            return self.engine.step()
        except Exception as exc:  # noqa: BLE001 - fail what is in flight, keep serving
            log.exception("engine step failed")
            with self._cond:
                ids = list(self._callbacks)
            return self.engine.fail(ids, f"{type(exc).__name__}: {exc}")

    def _publish_stats(self) -> None:
        """A new snapshot; requests added since the last one move from "queued" into it atomically."""
        stats = self.engine.stats()
        with self._cond:
            self._stats = stats
            self._queued_adds -= self._applied_adds
        self._applied_adds = 0

    def _take_callbacks(self, outputs: list[TokenOutput]) -> list[tuple[OutputCallback | None, TokenOutput]]:
        """Pairs each output with its callback (a finished output takes the callback away)."""
        with self._cond:
            pairs = []
            for out in outputs:
                get = self._callbacks.pop if out.finished else self._callbacks.get
                pairs.append((get(out.request_id, None), out))
        return pairs

    @staticmethod
    def _deliver(callback: OutputCallback | None, out: TokenOutput) -> None:
        if callback is None:
            return
        try:
            callback(out)
        except Exception:  # noqa: BLE001 - a caller's bug must not stop the engine
            log.exception("on_output for %s raised", out.request_id)
