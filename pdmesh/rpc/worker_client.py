"""The coordinator's client of the Worker gRPC service: plain dataclasses in and out.

Protobuf stops here, as it does at the Worker servicer. A failure raises ``WorkerError`` with a kind
(``pdmesh.errors``): the worker's in-band error code as it sent it, or, for a call that failed
outright, its gRPC status read as a kind:

- INVALID_ARGUMENT and DEADLINE_EXCEEDED as such;
- UNAVAILABLE, CANCELLED, INTERNAL, UNKNOWN (the instance went away or broke off the call) and
  FAILED_PRECONDITION (it changed role under us): UNAVAILABLE;
- any other status: UPSTREAM_FAILED.

The error's ``cause`` is the in-band code or the gRPC status, in lower case.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from pdmesh.errors import ErrorKind, WorkerError
from pdmesh.generation import PromptLogprob, SamplingParams
from pdmesh.kv.types import KVHandle
from pdmesh.rpc.client import DEFAULT_DEADLINE_S
from pdmesh.rpc.convert import (
    TokenLogprobs,
    handle_from_proto,
    handle_to_proto,
    logprobs_from_proto,
    prompt_logprobs_from_proto,
    sampling_to_proto,
)
from pdmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc

_STATUS_KINDS = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorKind.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorKind.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE: ErrorKind.UNAVAILABLE,
    grpc.StatusCode.CANCELLED: ErrorKind.UNAVAILABLE,
    grpc.StatusCode.INTERNAL: ErrorKind.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN: ErrorKind.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorKind.UNAVAILABLE,
}


@dataclass(frozen=True)
class PrefillResult:
    """A prefilled prompt: its first token and where its KV waits for a decode instance."""

    first_token: int
    finished: bool  # the first token already ends the request
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None  # the first token's, when asked
    handle: KVHandle | None  # None when finished
    # prompt logprobs (one per prompt token, the first None) when sampling.prompt_logprobs is set
    prompt_logprobs: list[PromptLogprob | None] | None = None


@dataclass(frozen=True)
class TokenChunk:
    """Tokens a Decode stream produced since its previous chunk; the last has ``finished`` set."""

    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprobs] | None  # one entry per token when asked, else None
    # prompt logprobs, on the first chunk of a request prefilled there, when asked
    prompt_logprobs: list[PromptLogprob | None] | None = None


def _status_error(exc: grpc.aio.AioRpcError) -> WorkerError:
    code = exc.code()
    kind = _STATUS_KINDS.get(code, ErrorKind.UPSTREAM_FAILED)
    return WorkerError(kind, exc.details() or "", cause=code.name.lower())


def _in_band_error(error: common_pb2.Error) -> WorkerError:
    name = common_pb2.ErrorCode.Name(error.code).removeprefix("ERROR_CODE_")
    return WorkerError(ErrorKind(name), error.message)


class DecodeStream:
    """The chunks of one Decode call; ``cancel()`` ends the call (the worker aborts and frees its
    blocks). Iterating raises ``WorkerError`` when the worker fails the request or the call."""

    def __init__(self, call) -> None:
        self._call = call

    def __aiter__(self) -> AsyncIterator[TokenChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[TokenChunk]:
        try:
            async for message in self._call:
                if message.HasField("error") and message.error.code:
                    raise _in_band_error(message.error)
                yield TokenChunk(
                    list(message.token_ids),
                    message.finished,
                    message.finish_reason or None,
                    logprobs_from_proto(message.logprobs),
                    prompt_logprobs_from_proto(message),
                )
        except grpc.aio.AioRpcError as exc:
            raise _status_error(exc) from exc

    def cancel(self) -> None:
        self._call.cancel()


class WorkerClient:
    """Prefill, Decode and Abort on one worker. ``time_left_s`` bounds the request on the worker
    (its deadline) and, unless ``timeout_s`` says less, the call."""

    def __init__(self, stub) -> None:
        self._stub = stub

    @classmethod
    def over(cls, channel: grpc.aio.Channel) -> WorkerClient:
        return cls(worker_pb2_grpc.WorkerStub(channel))

    async def prefill(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        time_left_s: float,
        timeout_s: float | None = None,
    ) -> PrefillResult:
        """Prefills the prompt and samples its first token; raises ``WorkerError``."""
        request = worker_pb2.PrefillRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            sampling=sampling_to_proto(sampling),
            deadline=time.time() + time_left_s,
        )
        try:
            reply = await self._stub.Prefill(request, timeout=timeout_s or time_left_s)
        except grpc.aio.AioRpcError as exc:
            raise _status_error(exc) from exc
        if reply.HasField("error") and reply.error.code:
            raise _in_band_error(reply.error)
        return PrefillResult(
            reply.first_token,
            reply.finished,
            reply.finish_reason or None,
            logprobs_from_proto(reply.logprobs),
            handle_from_proto(reply.handle) if reply.HasField("handle") else None,
            prompt_logprobs_from_proto(reply),
        )

    def decode(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        time_left_s: float,
        prefilled: PrefillResult | None = None,
    ) -> DecodeStream:
        """Streams the tokens after ``prefilled``'s first, pulling its KV; without it, the worker
        prefills the prompt itself and the stream starts with the first token."""
        request = worker_pb2.DecodeRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            sampling=sampling_to_proto(sampling),
            prefill_locally=prefilled is None,
            deadline=time.time() + time_left_s,
        )
        if prefilled is not None:
            request.first_token = prefilled.first_token
            if prefilled.handle is not None:
                request.handle.CopyFrom(handle_to_proto(prefilled.handle))
        return DecodeStream(self._stub.Decode(request, timeout=time_left_s))

    async def abort(self, request_id: str) -> bool:
        """Cancels the request wherever it is on the worker; True when it was found there."""
        request = worker_pb2.AbortRequest(request_id=request_id)
        try:
            reply = await self._stub.Abort(request, timeout=DEFAULT_DEADLINE_S)
        except grpc.aio.AioRpcError as exc:
            raise _status_error(exc) from exc
        return reply.found
