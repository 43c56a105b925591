"""``EngineRunner``: drives an ``LLMEngine`` on a daemon thread and calls back with each output.

Callers on other threads submit, abort and move KV blocks; every engine call happens under one
lock, so those are safe against a running step. The loop sleeps on a condition while there is no
work. A failing step fails the requests it held (FinishReason.ERROR) and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest, EngineStats, TokenOutput
from pdmesh.kv.types import KVLayout

log = logging.getLogger(__name__)

OutputCallback = Callable[[TokenOutput], None]


class EngineRunner:
    """The engine loop on its own thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._cond = threading.Condition(threading.RLock())
        self._callbacks: dict[str, OutputCallback] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

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

    def submit(self, request: EngineRequest, on_output: OutputCallback) -> None:
        """Queues ``request``; raises ValueError at once when the engine refuses it."""
        with self._cond:
            self.engine.add_request(request)
            self._callbacks[request.request_id] = on_output
            self._cond.notify_all()

    def abort(self, request_id: str) -> bool:
        with self._cond:
            found = self.engine.abort(request_id)
            self._cond.notify_all()
            return found

    def allocate_kv(self, num_tokens: int) -> list[int] | None:
        with self._cond:
            return self.engine.allocate_kv(num_tokens)

    def free_kv(self, block_ids: list[int]) -> None:
        with self._cond:
            self.engine.free_kv(block_ids)
            self._cond.notify_all()  # waiting prompts may fit now

    def stats(self) -> EngineStats:
        with self._cond:
            return self.engine.stats()

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

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.engine.has_unfinished():
                    self._cond.wait()
                if self._stopping:
                    return
                outputs = self._step()
                callbacks = [(self._callback_for(out), out) for out in outputs]
                idle = not outputs and self.engine.has_unfinished()
            for callback, out in callbacks:
                self._deliver(callback, out)
            if idle:  # work exists but nothing can run (e.g. waiting for blocks): do not spin
                with self._cond:
                    self._cond.wait(0.01)

    def _step(self) -> list[TokenOutput]:
        try:
            return self.engine.step()
        except Exception as exc:  # noqa: BLE001 - fail what is in flight, keep serving
            log.exception("engine step failed")
            ids = list(self._callbacks)
            return self.engine.fail(ids, f"{type(exc).__name__}: {exc}")

    def _callback_for(self, out: TokenOutput) -> OutputCallback | None:
        if out.finished:
            return self._callbacks.pop(out.request_id, None)
        return self._callbacks.get(out.request_id)

    @staticmethod
    def _deliver(callback: OutputCallback | None, out: TokenOutput) -> None:
        if callback is None:
            return
        try:
            callback(out)
        except Exception:  # noqa: BLE001 - a caller's bug must not stop the engine
            log.exception("on_output for %s raised", out.request_id)
