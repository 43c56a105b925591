"""The Worker gRPC servicer: protobuf stops here; the handlers work on dataclasses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from pdmesh.errors import ErrorKind, WorkerError
from pdmesh.generation import TokenOutput
from pdmesh.parallel.executor import GroupBroken
from pdmesh.rpc.convert import (
    handle_from_proto,
    handle_to_proto,
    logprobs_to_proto,
    prompt_logprobs_to_proto,
    sampling_from_proto,
)
from pdmesh.rpc.convert_cluster import role_from_proto, role_to_proto
from pdmesh.rpc.worker_client import FIRST_TOKEN_METADATA
from pdmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.worker.decode import DecodeHandler
from services.worker.expert_metrics import RebalanceRefused, rebalance
from services.worker.prefill import PrefillHandler

log = logging.getLogger(__name__)


def _error(exc: WorkerError) -> common_pb2.Error:
    code = common_pb2.ErrorCode.Value(f"ERROR_CODE_{exc.kind.value}")
    return common_pb2.Error(code=code, message=exc.message)


def _chunk(output: TokenOutput) -> worker_pb2.DecodeChunk:
    reason = output.finish_reason.value if output.finish_reason else ""
    return worker_pb2.DecodeChunk(
        token_ids=output.token_ids,
        finished=output.finished,
        finish_reason=reason,
        logprobs=logprobs_to_proto(output.logprobs),
        prompt_logprobs=prompt_logprobs_to_proto(output.prompt_logprobs),
    )


# Switches the worker's role in place: (new role) -> transfer endpoint; WorkerBusy while work remains.
RoleSwitch = Callable[[str], Awaitable[str]]


class WorkerBusy(RuntimeError):
    """The worker still runs requests or holds pinned KV handles; it cannot switch its role yet."""


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Prefill, Decode, Release, Abort and SetRole for whichever phases this worker's role allows;
    RebalanceExperts for a parallel MoE worker."""

    def __init__(
        self,
        role: str,
        prefill: PrefillHandler | None,
        decode: DecodeHandler,
        bridge,
        switch_role: RoleSwitch | None = None,
    ) -> None:
        self.role = role
        self.prefill_handler = prefill
        self.decode_handler = decode
        self.bridge = bridge
        self.switch_role = switch_role
        self.prompt_tokens_total = 0  # prompt tokens prefilled here (reported in heartbeats)

    async def SetRole(self, request, context):  # noqa: N802
        try:
            role = role_from_proto(request.role).value
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad SetRole: {exc}")
        if self.switch_role is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this worker cannot switch roles")
        previous = self.role
        try:
            endpoint = await self.switch_role(role)
        except WorkerBusy as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return worker_pb2.SetRoleResponse(previous_role=role_to_proto(previous), transfer_endpoint=endpoint)

    async def Prefill(self, request, context):  # noqa: N802 (gRPC method name)
        if self.prefill_handler is None or self.role == "decode":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"this worker's role is {self.role}, not prefill"
            )
        prompt_ids, sampling = await _validated(request, context)
        self.prompt_tokens_total += len(prompt_ids)

        async def early_token(token: int) -> None:  # the coordinator streams it before the reply
            await context.send_initial_metadata(((FIRST_TOKEN_METADATA, str(token)),))

        try:
            result = await self.prefill_handler.prefill(request.request_id, prompt_ids, sampling, early_token)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except WorkerError as exc:
            log.warning("[%s] prefill failed: %s", request.request_id, exc)
            return worker_pb2.PrefillResponse(error=_error(exc))
        reply = worker_pb2.PrefillResponse(
            first_token=result.first_token,
            finished=result.finished,
            finish_reason=result.finish_reason or "",
            num_prompt_tokens=result.num_prompt_tokens,
            logprobs=logprobs_to_proto(result.logprobs),
            prompt_logprobs=prompt_logprobs_to_proto(result.prompt_logprobs),
        )
        if result.handle is not None:
            reply.handle.CopyFrom(handle_to_proto(result.handle))
        return reply

    async def Decode(self, request, context) -> AsyncIterator[worker_pb2.DecodeChunk]:  # noqa: N802
        if self.role == "prefill":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this worker's role is prefill, not decode"
            )
        prompt_ids, sampling = await _validated(request, context)
        if request.prefill_locally:
            self.prompt_tokens_total += len(prompt_ids)
            outputs = self.decode_handler.generate_local(request.request_id, prompt_ids, sampling)
        elif request.HasField("handle"):
            handle = handle_from_proto(request.handle)
            outputs = self.decode_handler.decode(
                request.request_id, prompt_ids, request.first_token, sampling, handle
            )
        else:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "Decode needs a KV handle or prefill_locally"
            )
        try:
            async for output in outputs:
                yield _chunk(output)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except WorkerError as exc:
            log.warning("[%s] decode failed: %s", request.request_id, exc)
            yield worker_pb2.DecodeChunk(finished=True, finish_reason="error", error=_error(exc))

    async def RebalanceExperts(self, request, context):  # noqa: N802
        engine = self.bridge.engine_loop.engine
        try:  # on a thread of its own: it waits for the running step, the event loop must not
            report = await asyncio.to_thread(rebalance, engine)
        except RebalanceRefused as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except GroupBroken as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the instance broke: {exc}")
        log.info("experts rebalanced on request: %s", report)
        return worker_pb2.RebalanceExpertsResponse(**report)

    async def Release(self, request, context):  # noqa: N802
        if not request.handle_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "handle_id is empty")
        freed = False
        if self.prefill_handler is not None:
            freed = await self.prefill_handler.release(request.handle_id)
        return worker_pb2.ReleaseResponse(freed=freed)

    async def Abort(self, request, context):  # noqa: N802
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        found = self.bridge.engine_loop.abort(request.request_id)
        return worker_pb2.AbortResponse(found=found)


async def _validated(request, context):
    """The prompt and sampling of a Prefill or Decode request, or INVALID_ARGUMENT naming the problem."""
    if not request.request_id:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
    if not request.prompt_ids:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_ids is empty")
    try:
        sampling = sampling_from_proto(request.sampling)
    except ValueError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    return list(request.prompt_ids), sampling


__all__ = ["WorkerServicer", "WorkerBusy", "ErrorKind"]
