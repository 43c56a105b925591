"""One request, several sequences: what both fronts share for ``n`` > 1, ``best_of`` and prompt lists.

Each sample of a prompt is a request of its own to the backend. The samples of one prompt share the
prompt's KV instead of prefilling it once each: ``SharedPrompt`` lets the first sample start alone
and the others once it has its first token (its prompt is then in the prefix cache of the instance
that computed it), and sends them to that instance (``backend.Affinity``), where their prefill only
computes what the cache does not hold (the prompt's last, partial block).

Seeds: sample ``j`` of a request with ``seed`` s samples with seed ``s + j``, as vLLM derives its
children's seeds (wrapping within the signed 64-bit range the protocol carries). Without a seed every
sample draws its own random stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import replace
from typing import TypeVar

from pdmesh.generation import SamplingParams
from services.coordinator.backend import Affinity, GenerationBackend, GenerationChunk
from services.coordinator.validation import INT64_MIN

log = logging.getLogger(__name__)
T = TypeVar("T")

# Sequences one request may fan out to (prompts x best_of, or x n): a batch fits the default
# admission queue (max_inflight 256 + max_queue 1024) with room for other clients.
MAX_SEQUENCES = 1024


def child_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample ``index`` of a request seeded with ``seed`` (vLLM's ``seed + index``)."""
    if seed is None:
        return None
    return (seed + index - INT64_MIN) % 2**64 + INT64_MIN


def sample_sampling(sampling: SamplingParams, index: int, ranked: bool) -> SamplingParams:
    """Sample ``index``'s sampling: its own seed; with ``ranked`` (best_of > n) the chosen tokens'
    logprobs too, which rank the samples (the answer shows them only when the client asked)."""
    child = replace(sampling, seed=child_seed(sampling.seed, index))
    if ranked:
        child.logprobs = max(child.logprobs, 1)
    return child


def sequences_error(prompts: int, samples: int) -> str | None:
    """Why a fan-out of ``prompts`` x ``samples`` sequences is refused; None when it is not."""
    if prompts * samples > MAX_SEQUENCES:
        return (
            f"this request asks for {prompts * samples} sequences ({prompts} prompts x {samples} samples);"
            f" at most {MAX_SEQUENCES} are served per request"
        )
    return None


class SharedPrompt:
    """A ``GenerationBackend`` for the samples of one prompt: the first request to start prefills
    it; the others wait for its first token, then go where it was prefilled (the backend's
    ``Affinity``). A first sample that fails or ends before a token lets the others go on their own."""

    def __init__(self, backend: GenerationBackend) -> None:
        self.backend = backend
        self.affinity = Affinity()
        self._led = False
        self._prefilled = asyncio.Event()

    def ready(self) -> bool:
        return self.backend.ready()

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        affinity: Affinity | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        leader, self._led = not self._led, True
        if not leader:
            await self._prefilled.wait()
        generator = self.backend.generate(request_id, prompt_ids, sampling, affinity=self.affinity)
        try:
            async for chunk in generator:
                if leader:
                    self._prefilled.set()
                yield chunk
        finally:
            if leader:
                self._prefilled.set()
            await generator.aclose()


_END = object()


async def merge(iterators: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """The items of all ``iterators`` as they come, each with its iterator's index. An iterator's
    error is raised here; closing the merge (or an error) closes every iterator."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=2 * len(iterators))

    async def pump(index: int, iterator: AsyncIterator[T]) -> None:
        try:
            async for item in iterator:
                await queue.put((index, item, None))
            await queue.put((index, _END, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((index, _END, exc))
        finally:
            close = getattr(iterator, "aclose", None)
            if close is not None:  # an iterator left at a yield by a cancellation: end its work now
                await close()

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(iterators)]
    running = len(tasks)
    try:
        while running:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is _END:
                running -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def all_or_cancel(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """Every result, in order; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
