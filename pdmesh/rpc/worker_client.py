"""The coordinator's client of the Worker gRPC service: plain dataclasses in and out.

Protobuf stops here, as it does at the Worker servicer. A failure raises ``WorkerError`` with a kind
(``pdmesh.errors``): the worker's in-band error code as it sent it, or, for a call that failed
outright, its gRPC status read as a kind:

- INVALID_ARGUMENT and DEADLINE_EXCEEDED as such;
- UNAVAILABLE, CANCELLED, INTERNAL, UNKNOWN (the instance went away or broke off the call) and
  FAILED_PRECONDITION (it changed role under us): UNAVAILABLE;
- any other status: UPSTREAM_FAILED.

The error's ``cause`` is the in-band code or the gRPC status, in lower case.

Prefill's first token comes ahead of its KV handle: a prefill worker whose request goes on to a
decode instance sends the token in the call's initial metadata (``FIRST_TOKEN_METADATA``) as soon
as the engine sampled it, then registers the handle and answers. ``PrefillCall.first_token`` hands
it over at once, so the coordinator streams token 1 while the handle is still being registered
(a worker that does not send it early costs nothing: ``first_token`` is then None). The call is made
as a response stream so that the initial metadata can be read before the reply: a unary call reads
both in one batch. The wire is the same, so either side may be of an older version.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
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

FIRST_TOKEN_METADATA = "pdmesh-first-token"  # Prefill's initial metadata: the first token, ahead of the reply
PREFILL_METHOD = "/pdmesh.v1.Worker/Prefill"

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


class PrefillCall:
    """One Prefill in flight: ``first_token`` as soon as the worker sends it ahead of the reply (else
    None), then ``result``. ``cancel()`` ends the call; the worker then frees what it pinned."""

    def __init__(self, call=None, reply: Awaitable | None = None) -> None:
        self._call = call  # a response-streaming call (initial metadata readable before the reply)
        self._reply = reply  # or a plain unary call's reply (no early token)

    async def first_token(self) -> int | None:
        """The first token when the worker sent it early; None when it did not (or the call failed:
        ``result`` raises then)."""
        if self._call is None:
            return None
        try:
            metadata = await self._call.initial_metadata()
        except grpc.aio.AioRpcError:
            return None
        for key, value in metadata or ():
            if key == FIRST_TOKEN_METADATA:
                return int(value)
        return None

    async def result(self) -> PrefillResult:
        """The whole answer (first token, KV handle); raises ``WorkerError``."""
        try:
            reply = await (self._reply if self._call is None else self._call.read())
        except grpc.aio.AioRpcError as exc:
            raise _status_error(exc) from exc
        if reply is grpc.aio.EOF:
            raise WorkerError(ErrorKind.UNAVAILABLE, "Prefill ended without a reply", cause="no_reply")
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

    def cancel(self) -> None:
        """Ends the call unless it is over (a call whose reply was read needs no cancelling)."""
        if self._call is not None and not self._call.done():
            self._call.cancel()


class WorkerClient:
    """Prefill, Decode and Abort on one worker. ``time_left_s`` bounds the request on the worker
    (its deadline) and, unless ``timeout_s`` says less, the call."""

    def __init__(self, stub, prefill_stream=None) -> None:
        self._stub = stub
        self._prefill_stream = prefill_stream  # Prefill read as a stream (None: as a unary call)

    @classmethod
    def over(cls, channel: grpc.aio.Channel) -> WorkerClient:
        prefill_stream = channel.unary_stream(
            PREFILL_METHOD,
            request_serializer=worker_pb2.PrefillRequest.SerializeToString,
            response_deserializer=worker_pb2.PrefillResponse.FromString,
        )
        return cls(worker_pb2_grpc.WorkerStub(channel), prefill_stream)

    def start_prefill(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        time_left_s: float,
        timeout_s: float | None = None,
    ) -> PrefillCall:
        """Starts prefilling the prompt and sampling its first token (``PrefillCall``)."""
        request = worker_pb2.PrefillRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            sampling=sampling_to_proto(sampling),
            deadline=time.time() + time_left_s,
        )
        timeout = timeout_s or time_left_s
        if self._prefill_stream is None:
            return PrefillCall(reply=self._stub.Prefill(request, timeout=timeout))
        return PrefillCall(call=self._prefill_stream(request, timeout=timeout))

    async def prefill(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        time_left_s: float,
        timeout_s: float | None = None,
    ) -> PrefillResult:
        """Prefills the prompt and samples its first token; raises ``WorkerError``."""
        call = self.start_prefill(request_id, prompt_ids, sampling, time_left_s, timeout_s)
        try:
            return await call.result()
        except BaseException:
            call.cancel()
            raise

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
