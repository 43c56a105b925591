"""The decode phase: claim the handle, allocate blocks, pull the KV, release the handle, decode.

A pull that fails for any reason frees what was allocated and answers KV_UNAVAILABLE, so that the
coordinator can prefill again elsewhere; no partial KV is ever decoded from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from pdmesh.engine.types import EngineRequest
from pdmesh.errors import ErrorKind, WorkerError
from pdmesh.generation import FinishReason, RequestMode, SamplingParams, TokenOutput
from pdmesh.kv.registry import KVError, KVRegistry
from pdmesh.kv.transfer.errors import TransferError
from pdmesh.kv.types import KVHandle
from pdmesh.observability import tracing
from services.worker.bridge import EngineBridge
from services.worker.kv_plane import KVPlane

log = logging.getLogger(__name__)
CLIENT = tracing.SpanKind.CLIENT

PULL_TIMEOUT_S = 30.0
ALLOCATE_WAIT_S = 10.0


class DecodeHandler:
    """Serves Decode: from a KV handle (PD) or by prefilling locally (mixed)."""

    def __init__(
        self,
        bridge: EngineBridge,
        registry: KVRegistry | None,
        kv: KVPlane | None,
        instance_id: str,
        lease_s: float,
        release_remote: Callable[[str, str], Awaitable[None]],
    ) -> None:
        self.bridge = bridge
        self.registry = registry
        self.kv = kv
        self.instance_id = instance_id
        self.lease_s = lease_s
        # (prefill address, handle_id): tells the prefill worker to free its blocks now
        self.release_remote = release_remote
        self._background: set[asyncio.Task] = set()  # referenced until done: the loop holds tasks weakly
        self.metrics = None  # services.worker.metrics.WorkerMetrics, set by the worker

    async def generate_local(
        self, request_id: str, prompt_ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[TokenOutput]:
        """The whole request in this engine (mixed serving); the first output holds the first token."""
        request = EngineRequest(request_id, prompt_ids, sampling, mode=RequestMode.MIXED)
        phases = tracing.EnginePhases("prefill.queue", "prefill.compute", "decode.finish")
        async for output in self.bridge.stream(request):
            _raise_on_failure(output)
            phases.observe(output)
            yield output

    async def decode(
        self,
        request_id: str,
        prompt_ids: list[int],
        first_token: int,
        sampling: SamplingParams,
        handle: KVHandle,
    ) -> AsyncIterator[TokenOutput]:
        """Pulls the KV named by ``handle`` and streams the tokens after ``first_token``."""
        block_ids = await self._fetch_kv(request_id, handle)
        request = EngineRequest(
            request_id,
            prompt_ids,
            sampling,
            mode=RequestMode.DECODE,
            first_token=first_token,
            kv_block_ids=block_ids,
        )
        phases = tracing.EnginePhases("decode.queue", "decode.first_step", "decode.finish")
        async for output in self.bridge.stream(request):
            _raise_on_failure(output)
            phases.observe(output)
            yield output

    async def _fetch_kv(self, request_id: str, handle: KVHandle) -> list[int]:
        if self.registry is None or self.kv is None:
            raise WorkerError(
                ErrorKind.INVALID_ARGUMENT, "this worker cannot pull KV (no registry or transfer)"
            )
        refusal = self.kv.refusal(handle)  # checked before the claim: nothing moves when it fails
        if refusal:
            raise WorkerError(ErrorKind.INVALID_ARGUMENT, refusal)
        try:
            claim = self.registry.claim(handle.handle_id, self.instance_id, self.lease_s)
            claimed = await tracing.traced("kv.claim", claim, {"pdmesh.kv.handle_id": handle.handle_id})
        except KVError as exc:
            raise WorkerError(
                ErrorKind.KV_UNAVAILABLE, f"cannot claim KV handle {handle.handle_id}: {exc}"
            ) from exc
        if self.metrics is not None:
            self.metrics.handle("claimed")
        block_ids = await self._allocate(handle.num_tokens)
        try:
            await self._pull(request_id, claimed, block_ids)
        except BaseException:
            self.bridge.engine_loop.free_kv(block_ids)
            raise
        await self._release(handle)
        return block_ids

    async def _allocate(self, num_tokens: int) -> list[int]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ALLOCATE_WAIT_S
        while True:
            block_ids = await self.bridge.engine_loop.allocate_kv(num_tokens)
            if block_ids is not None:
                return block_ids
            if loop.time() > deadline:
                raise WorkerError(ErrorKind.OVERLOADED, f"no free KV blocks for {num_tokens} tokens")
            await asyncio.sleep(0.05)

    async def _pull(self, request_id: str, handle: KVHandle, block_ids: list[int]) -> None:
        renewer = asyncio.ensure_future(self._renew_while_pulling(handle.handle_id))
        try:
            pull = self.kv.pull(handle, block_ids, PULL_TIMEOUT_S)
            await tracing.traced("kv.transfer.receive", pull, _transfer_attributes(handle, block_ids), CLIENT)
        except TransferError as exc:
            raise WorkerError(
                ErrorKind.KV_UNAVAILABLE, f"KV pull from {handle.transfer_endpoint} failed: {exc}"
            ) from exc
        finally:
            renewer.cancel()
        log.info("[%s] pulled %d blocks from %s", request_id, len(block_ids), handle.prefill_instance)

    async def _renew_while_pulling(self, handle_id: str) -> None:
        with contextlib.suppress(KVError):
            while True:
                await asyncio.sleep(self.lease_s / 3)
                await self.registry.renew(handle_id, self.lease_s)

    async def _release(self, handle: KVHandle) -> None:
        """Marks the handle released and tells the prefill worker; its reaper is the fallback."""
        try:
            await self.registry.release(handle.handle_id)
        except KVError as exc:
            log.warning("[%s] could not mark handle released: %s", handle.request_id, exc)
        if handle.prefill_address:
            self._spawn(self.release_remote(handle.prefill_address, handle.handle_id))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Waits briefly for the releases still being sent (the prefill reaper is their fallback)."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=1.0)


def _transfer_attributes(handle: KVHandle, block_ids: list[int]) -> dict:
    return {
        "pdmesh.kv.backend": handle.transfer_endpoint.partition("://")[0],
        "pdmesh.kv.bytes": len(block_ids) * handle.layout.block_nbytes,
        "pdmesh.kv.blocks": len(block_ids),
        "pdmesh.kv.handle_id": handle.handle_id,
        "pdmesh.kv.source_instance": handle.prefill_instance,
    }


def _raise_on_failure(output: TokenOutput) -> None:
    if output.finish_reason == FinishReason.ERROR:
        raise WorkerError(ErrorKind.INTERNAL, output.error or "the engine failed this request")
