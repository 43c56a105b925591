"""The prefill phase: run the prompt, pin its KV, register a handle, serve the pull, free on release.

Every pinned block is freed exactly once: on ``Release`` from the decode worker, or by the reaper
when the registry says the handle was released, expired or invalidated, or (Redis away) when the
local lease has run out with a grace period. The reaper never looks at a handle whose registration is
still in flight: "not in Redis yet" is not "dead" (a slow Redis would otherwise free blocks the
coordinator is about to hand to a decode worker).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pdmesh.aio import raise_lost_cancellation
from pdmesh.engine.types import EngineRequest
from pdmesh.errors import ErrorKind, WorkerError
from pdmesh.generation import FinishReason, PromptLogprob, RequestMode, SamplingParams
from pdmesh.kv.registry import KVError, KVRegistry
from pdmesh.kv.types import HandleState, KVHandle
from pdmesh.observability import tracing
from services.worker.bridge import EngineBridge
from services.worker.kv_plane import KVPlane

log = logging.getLogger(__name__)

# Without Redis the reaper cannot ask the registry; it then frees a handle this long after its lease.
OFFLINE_GRACE_S = 5.0

# Sends a prefilled request's first token on ahead of its KV handle (the servicer: initial metadata).
EarlyToken = Callable[[int], Awaitable[None]]


@dataclass
class PrefillResult:
    first_token: int
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    handle: KVHandle | None
    # The first token's (chosen logprob, {top id: logprob}) when sampling.logprobs > 0.
    logprobs: list[tuple[float, dict[int, float]]] | None = None
    prompt_logprobs: list[PromptLogprob | None] | None = None  # when sampling.prompt_logprobs is set


@dataclass
class _Pinned:
    block_ids: list[int]
    expires_at: float
    registering: bool = True  # until registry.register returned


class PrefillHandler:
    """Serves Prefill and Release and reaps the blocks of handles nobody will pull."""

    def __init__(
        self,
        bridge: EngineBridge,
        registry: KVRegistry,
        kv: KVPlane,
        instance_id: str,
        address: str,
        lease_s: float,
    ) -> None:
        self.bridge = bridge
        self.registry = registry
        self.kv = kv
        self.instance_id = instance_id
        self.address = address
        self.lease_s = lease_s
        self._pinned: dict[str, _Pinned] = {}
        self.metrics = None  # services.worker.metrics.WorkerMetrics, set by the worker

    @property
    def pinned_handles(self) -> int:
        return len(self._pinned)

    async def prefill(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        early_token: EarlyToken | None = None,
    ) -> PrefillResult:
        """Runs the prompt; a request that goes on to a decode instance has its KV pinned and a handle
        registered. ``early_token`` gets its first token before that (when no logprobs travel with
        it), so that the caller can stream the token while the handle is being registered."""
        request = EngineRequest(request_id, prompt_ids, sampling, mode=RequestMode.PREFILL)
        phases = tracing.EnginePhases("prefill.queue", "prefill.compute")
        output = await self.bridge.run_to_end(request)
        phases.observe(output)
        if output.finish_reason == FinishReason.ERROR:
            raise WorkerError(ErrorKind.INTERNAL, output.error or "prefill failed")
        if output.finish_reason == FinishReason.ABORT:
            raise WorkerError(ErrorKind.ABORTED, "request aborted")
        first_token = output.token_ids[0]
        if output.kv_block_ids is None:
            reason = output.finish_reason.value if output.finish_reason else "stop"
            return PrefillResult(
                first_token, True, reason, len(prompt_ids), None, output.logprobs, output.prompt_logprobs
            )
        if early_token is not None and not output.logprobs and not output.prompt_logprobs:
            await early_token(first_token)
            tracing.current_span().add_event("pdmesh.first_token_sent")  # traces: before kv.register
        with tracing.tracer().start_as_current_span("kv.register") as span:
            handle = await self._publish(request_id, len(prompt_ids), output.kv_block_ids)
            span.set_attribute("pdmesh.kv.handle_id", handle.handle_id)
        return PrefillResult(
            first_token, False, None, len(prompt_ids), handle, output.logprobs, output.prompt_logprobs
        )

    async def _publish(self, request_id: str, num_tokens: int, block_ids: list[int]) -> KVHandle:
        handle_id = f"{request_id}:{uuid.uuid4().hex[:8]}"
        secret = secrets.token_urlsafe(24)  # a puller must present it; it lives only in the registry
        pinned = self._pinned[handle_id] = _Pinned(list(block_ids), time.time() + self.lease_s)
        try:
            parts = await self.kv.expose(handle_id, list(block_ids), secret)
        except BaseException as exc:
            self.free(handle_id)
            if isinstance(exc, Exception):
                raise WorkerError(ErrorKind.INTERNAL, f"cannot expose the KV on every rank: {exc}") from exc
            raise
        handle = KVHandle(
            handle_id=handle_id,
            request_id=request_id,
            prefill_instance=self.instance_id,
            transfer_endpoint=parts[0].endpoint if parts else self.kv.endpoint,
            block_ids=list(block_ids),
            num_tokens=num_tokens,
            layout=self.bridge.engine_loop.kv_layout,
            expires_at=pinned.expires_at,
            prefill_address=self.address,
            parts=parts,
            secret=secret,
        )
        try:
            await self.registry.register(handle, self.lease_s)
        except KVError as exc:
            await self.release(handle.handle_id, event=None)  # the write may have landed before the error
            raise WorkerError(ErrorKind.INTERNAL, f"cannot register the KV handle: {exc}") from exc
        except BaseException:  # cancelled: nobody will pull it (a key written expires with its lease)
            self.free(handle.handle_id)
            raise
        finally:
            pinned.registering = False
        if self.metrics is not None:
            self.metrics.handle("registered")
        log.info(
            "[%s] prefilled %d tokens into %d blocks%s, handle %s",
            request_id,
            num_tokens,
            len(block_ids),
            f" on dp replica {parts[0].dp_rank} ({len(parts)} ranks)" if parts else "",
            handle.handle_id,
        )
        return handle

    def free(self, handle_id: str) -> bool:
        """Frees a handle's blocks; freeing twice is harmless (returns False the second time)."""
        pinned = self._pinned.pop(handle_id, None)
        if pinned is None:
            return False
        self.kv.withdraw(handle_id)
        self.bridge.engine_loop.free_kv(pinned.block_ids)
        log.info("[%s] freed %d pinned blocks", handle_id.split(":")[0], len(pinned.block_ids))
        return True

    async def release(self, handle_id: str, event: str | None = "released") -> bool:
        """Frees the blocks and forgets the handle; ``event`` is what the metrics count it as."""
        freed = self.free(handle_id)
        if freed and event and self.metrics is not None:
            self.metrics.handle(event)
        try:
            await self.registry.forget(handle_id)
        except KVError as exc:
            log.warning("[%s] could not forget handle in the registry: %s", handle_id.split(":")[0], exc)
        return freed

    async def reap_once(self) -> int:
        """Frees every pinned handle that no decode worker will pull any more; returns how many."""
        reaped = 0
        for handle_id, pinned in list(self._pinned.items()):
            event = await self._dead_event(handle_id, pinned)
            if event is not None:
                await self.release(handle_id, event)
                reaped += 1
        return reaped

    async def _dead_event(self, handle_id: str, pinned: _Pinned) -> str | None:
        """None while the handle may still be pulled; else "released" (pulled) or "expired"."""
        if pinned.registering:
            return None
        try:
            handle = await self.registry.get(handle_id)
        except KVError:
            return "expired" if time.time() > pinned.expires_at + OFFLINE_GRACE_S else None
        if handle is None:
            return "expired"
        if handle.state in (HandleState.CLAIMED, HandleState.READY):
            return None  # CLAIMED: a pull is in flight; the decode worker renews the lease
        return "released" if handle.state == HandleState.RELEASED else "expired"

    async def reap_forever(self, interval_s: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reap_once()
            except Exception:  # the reaper must outlive any one bad pass
                log.exception("KV reaper pass failed")
            raise_lost_cancellation()

    def free_all(self) -> None:
        for handle_id in list(self._pinned):
            self.free(handle_id)
