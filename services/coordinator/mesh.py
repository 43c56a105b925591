"""The coordinator's backend: drives one request through a prefill and a decode instance.

Flow (decode pulls): Prefill on a prefill instance -> first token and KV handle -> stream the first
token -> Decode on a decode instance with the handle -> stream the rest. KV_UNAVAILABLE (or a
prefill or decode instance that fails before any decoded token) -> prefill again on another
instance, at most ``max_retry`` times. With only mixed instances healthy, a mixed instance serves
the whole request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from pdmesh.cluster import InstanceInfoData
from pdmesh.config import CoordinatorConfig
from pdmesh.engine.types import SamplingParams
from pdmesh.rpc.client import DEFAULT_DEADLINE_S, open_channel
from pdmesh.rpc.convert import sampling_to_proto
from pdmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.coordinator.backend import GenerationChunk, GenerationError
from services.coordinator.routing import Router

log = logging.getLogger(__name__)

KV_UNAVAILABLE = common_pb2.ERROR_CODE_KV_UNAVAILABLE
INVALID_ARGUMENT = common_pb2.ERROR_CODE_INVALID_ARGUMENT
RETRYABLE_STATUS = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


class _Retry(Exception):
    """This attempt lost its KV or its instance; prefill again elsewhere."""


class MeshBackend:
    """A ``GenerationBackend`` over the worker mesh."""

    def __init__(self, router: Router, config: CoordinatorConfig) -> None:
        self.router = router
        self.config = config
        self._channels: dict[str, grpc.aio.Channel] = {}

    def ready(self) -> bool:
        return self.router.ready()

    def _stub(self, instance: InstanceInfoData) -> worker_pb2_grpc.WorkerStub:
        channel = self._channels.get(instance.address)
        if channel is None:
            channel = self._channels[instance.address] = open_channel(instance.address)
        return worker_pb2_grpc.WorkerStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        deadline = time.monotonic() + self.config.request_timeout_s
        if self.router.can_disaggregate():
            stream = self._disaggregated(request_id, prompt_ids, sampling, deadline)
        elif self.router.pick_mixed() is not None:
            stream = self._colocated(request_id, prompt_ids, sampling, deadline)
        else:
            raise GenerationError("no healthy prefill and decode instances", status_code=503)
        async for chunk in stream:
            yield chunk

    async def _disaggregated(
        self, request_id, prompt_ids, sampling, deadline
    ) -> AsyncIterator[GenerationChunk]:
        tried: set[str] = set()
        first_token: int | None = None
        last_failure = ""
        for attempt in range(self.config.max_retry + 1):
            prefill = self.router.pick_prefill(exclude=tried)
            decode = self.router.pick_decode()
            if prefill is None or decode is None:
                raise GenerationError("no healthy prefill and decode instances", status_code=503)
            tried.add(prefill.instance_id)
            try:
                reply = await self._prefill(prefill, request_id, prompt_ids, sampling, deadline)
                if first_token is None:
                    first_token = reply.first_token
                    yield GenerationChunk([first_token], reply.finished, reply.finish_reason or None)
                if reply.finished:
                    return
                async for chunk in self._decode(
                    decode, request_id, prompt_ids, first_token, sampling, reply, deadline
                ):
                    yield chunk
                return
            except _Retry as why:
                last_failure = str(why)
                log.warning("[%s] attempt %d failed (%s); prefilling again", request_id, attempt + 1, why)
        attempts = self.config.max_retry + 1
        raise GenerationError(
            f"request failed after {attempts} attempts; last: {last_failure}", status_code=503
        )

    async def _prefill(
        self, instance, request_id, prompt_ids, sampling, deadline
    ) -> worker_pb2.PrefillResponse:
        request = worker_pb2.PrefillRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            sampling=sampling_to_proto(sampling),
            deadline=time.time() + _remaining(deadline),
        )
        timeout = min(self.config.first_token_timeout_s, _remaining(deadline))
        try:
            reply = await self._stub(instance).Prefill(request, timeout=timeout)
        except asyncio.CancelledError:
            await self._abort(instance, request_id)
            raise
        except grpc.aio.AioRpcError as exc:
            _raise_for_status(exc, instance, "prefill")
        if reply.HasField("error") and reply.error.code:
            _raise_for_error(reply.error, instance)
        return reply

    async def _decode(self, instance, request_id, prompt_ids, first_token, sampling, reply, deadline):
        request = worker_pb2.DecodeRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            first_token=first_token,
            sampling=sampling_to_proto(sampling),
            handle=reply.handle,
            deadline=time.time() + _remaining(deadline),
        )
        async for chunk in self._stream_decode(instance, request, deadline, tokens_before=1):
            yield chunk

    async def _colocated(self, request_id, prompt_ids, sampling, deadline) -> AsyncIterator[GenerationChunk]:
        instance = self.router.pick_mixed()
        request = worker_pb2.DecodeRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            sampling=sampling_to_proto(sampling),
            prefill_locally=True,
            deadline=time.time() + _remaining(deadline),
        )
        try:
            async for chunk in self._stream_decode(instance, request, deadline, tokens_before=0):
                yield chunk
        except _Retry as why:
            raise GenerationError(
                f"mixed instance {instance.instance_id} failed: {why}", status_code=503
            ) from None

    async def _stream_decode(
        self, instance, request, deadline, tokens_before: int
    ) -> AsyncIterator[GenerationChunk]:
        call = self._stub(instance).Decode(request, timeout=_remaining(deadline))
        sent = tokens_before
        try:
            async for chunk in call:
                if chunk.HasField("error") and chunk.error.code:
                    if sent > tokens_before:
                        raise GenerationError(f"decode failed: {chunk.error.message}", status_code=502)
                    _raise_for_error(chunk.error, instance)
                sent += len(chunk.token_ids)
                yield GenerationChunk(list(chunk.token_ids), chunk.finished, chunk.finish_reason or None)
                if chunk.finished:
                    return
        except grpc.aio.AioRpcError as exc:
            if sent > tokens_before:
                raise GenerationError(
                    f"decode instance {instance.instance_id} failed mid-stream: {exc.details()}",
                    status_code=502,
                ) from exc
            _raise_for_status(exc, instance, "decode")
        finally:
            call.cancel()  # the client went away or we are done: the worker aborts and frees blocks
        raise GenerationError(
            f"decode stream from {instance.instance_id} ended without finishing", status_code=502
        )

    async def _abort(self, instance: InstanceInfoData, request_id: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await self._stub(instance).Abort(
                worker_pb2.AbortRequest(request_id=request_id), timeout=DEFAULT_DEADLINE_S
            )


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise GenerationError("request timed out", status_code=504)
    return remaining


def _raise_for_status(exc: grpc.aio.AioRpcError, instance: InstanceInfoData, phase: str):
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        raise GenerationError(exc.details() or "invalid request", status_code=400) from exc
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise GenerationError(f"{phase} timed out at {instance.instance_id}", status_code=504) from exc
    if code in RETRYABLE_STATUS or code == grpc.StatusCode.FAILED_PRECONDITION:
        raise _Retry(f"{phase} at {instance.instance_id}: {code.name} {exc.details()}") from exc
    raise GenerationError(
        f"{phase} failed at {instance.instance_id}: {exc.details()}", status_code=502
    ) from exc


def _raise_for_error(error: common_pb2.Error, instance: InstanceInfoData):
    if error.code == INVALID_ARGUMENT:
        raise GenerationError(error.message, status_code=400)
    if error.code == common_pb2.ERROR_CODE_OVERLOADED:
        raise GenerationError(f"{instance.instance_id} is overloaded: {error.message}", status_code=503)
    raise _Retry(f"{common_pb2.ErrorCode.Name(error.code)} at {instance.instance_id}: {error.message}")
