"""Bridges the engine thread's callbacks into asyncio: one async stream of outputs per request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from pdmesh.engine.engine_loop import EngineLoop
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import TokenOutput

log = logging.getLogger(__name__)


class EngineBridge:
    """Submits requests to an ``EngineLoop`` and yields their outputs on the event loop."""

    def __init__(self, engine_loop: EngineLoop) -> None:
        self.engine_loop = engine_loop

    async def stream(self, request: EngineRequest) -> AsyncIterator[TokenOutput]:
        """Yields every output of ``request`` until the finished one.

        Raises ValueError (synchronously at the first iteration) when the engine refuses the request.
        Closing the iterator early aborts the request in the engine, which frees its blocks; a prefill
        that finished after its caller left has its pinned blocks freed here, since nobody else will.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        closed = False

        def deliver(output: TokenOutput) -> None:  # on the event loop, so ``closed`` cannot race
            if closed:
                self._free_orphan(output)
            else:
                queue.put_nowait(output)

        self.engine_loop.submit(request, lambda output: loop.call_soon_threadsafe(deliver, output))
        finished = False
        try:
            while True:
                output = await queue.get()
                finished = output.finished
                yield output
                if finished:
                    return
        finally:
            closed = True
            while not queue.empty():
                self._free_orphan(queue.get_nowait())
            if not finished:
                log.info("[%s] aborting in the engine: its caller went away", request.request_id)
                self.engine_loop.abort(request.request_id)

    def _free_orphan(self, output: TokenOutput) -> None:
        if output.kv_block_ids:
            log.info("[%s] freeing %d blocks nobody took", output.request_id, len(output.kv_block_ids))
            self.engine_loop.free_kv(output.kv_block_ids)

    async def run_to_end(self, request: EngineRequest) -> TokenOutput:
        """Runs ``request`` and merges its outputs into one (all tokens and their logprobs, the prompt
        logprobs, the last output's other fields)."""
        tokens: list[int] = []
        logprobs: list[tuple[float, dict[int, float]]] = []
        prompt_logprobs = None  # on the output with the first token
        last: TokenOutput | None = None
        async for output in self.stream(request):
            tokens.extend(output.token_ids)
            logprobs.extend(output.logprobs or ())
            prompt_logprobs = prompt_logprobs or output.prompt_logprobs
            last = output
        assert last is not None
        last.token_ids = tokens
        last.logprobs = logprobs or None
        last.prompt_logprobs = prompt_logprobs
        return last
