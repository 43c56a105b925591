"""The coordinator's gRPC ``Generate`` stream for programs; protobuf stops here.

Unset numeric sampling fields take OpenAI's defaults (proto3 cannot tell 0 from unset), except
``temperature``, where 0 means greedy; an unset ``max_tokens`` is the context left after the prompt,
capped at 256. Lengths (``limits``), sampling values and token ids (``validation``) are checked as
over HTTP, and refused with the same words. With ``sampling.logprobs`` N > 0 each message carries one
``TokenLogprobs`` (chosen logprob, top N ids and logprobs) per entry of its ``token_ids``; with
``sampling.prompt_logprobs`` N set, the first message carries ``prompt_logprobs``: each prompt token's
logprob and rank and the top N there, from the second prompt token on. A backend's
error kind is answered with its gRPC status (``GRPC_STATUS``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import grpc

from pdmesh import structured as constraints
from pdmesh.errors import ErrorKind
from pdmesh.generation import SamplingParams
from pdmesh.observability import http_tracing
from pdmesh.rpc.convert import logprobs_to_proto, prompt_logprobs_to_proto, structured_from_proto
from pdmesh.tokenizer import IncrementalDetokenizer, Tokenizer
from pdmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from services.coordinator.api_keys import KeyRing, bearer
from services.coordinator.backend import GenerationBackend, GenerationError
from services.coordinator.fanout import SharedPrompt, merge, sample_sampling, sequences_error
from services.coordinator.front_metrics import count_grpc_requests
from services.coordinator.limits import completion_budget
from services.coordinator.validation import check_sampling, check_token_ids

log = logging.getLogger(__name__)

GRPC_STATUS = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.KV_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UPSTREAM_FAILED: grpc.StatusCode.INTERNAL,
    ErrorKind.ABORTED: grpc.StatusCode.INTERNAL,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def sampling_with_defaults(msg: common_pb2.SamplingParams) -> SamplingParams:
    params = SamplingParams(
        temperature=msg.temperature,
        top_p=msg.top_p or 1.0,
        top_k=msg.top_k,
        min_p=msg.min_p,
        repetition_penalty=msg.repetition_penalty or 1.0,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        seed=msg.seed if msg.HasField("seed") else None,
        max_tokens=msg.max_tokens or 1,  # the real budget is set against the prompt (limits)
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        structured=structured_from_proto(msg),  # structured outputs
    )
    check_sampling(params)
    params.validate()
    if params.structured is not None:  # structured outputs: compiled here, a bad one is INVALID_ARGUMENT
        constraints.check(params.structured)
    return params


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    """Generate: tokenize, route through the mesh, detokenize, stream text deltas."""

    def __init__(
        self, backend: GenerationBackend, tokenizer: Tokenizer, model_name: str, max_model_len: int
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.api_keys: KeyRing | None = None  # set: callers must send `authorization: Bearer KEY`

    def _key_ok(self, context) -> bool:
        if self.api_keys is None:
            return True
        metadata = dict(context.invocation_metadata() or ())
        return self.api_keys.match(bearer(metadata.get("authorization"))) is not None

    def _prompt_ids(self, request) -> list[int]:
        which = request.WhichOneof("input")
        if which == "prompt":
            return self.tokenizer.encode(request.prompt)
        if which == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not messages:
                raise ValueError("chat has no messages")
            return self.tokenizer.encode_chat(messages)
        if which == "prompt_ids":
            return list(request.prompt_ids.ids)
        raise ValueError("one of prompt, chat or prompt_ids is required")

    def _validate(self, request, prompt_ids: list[int], sampling: SamplingParams) -> None:
        if request.model and request.model != self.model_name:
            raise ValueError(f"unknown model {request.model!r}; this server serves {self.model_name!r}")
        check_token_ids(prompt_ids, self.tokenizer.vocab_size, "prompt_ids")
        check_token_ids(sampling.stop_token_ids, self.tokenizer.vocab_size, "stop_token_ids")
        if request.n < 0:
            raise ValueError(f"n must be >= 1 (or unset), not {request.n}")
        if (too_many := sequences_error(1, request.n)) is not None:
            raise ValueError(f"n: {too_many}")
        requested = request.sampling.max_tokens or None  # unset: the context left, as over HTTP
        sampling.max_tokens = completion_budget(len(prompt_ids), requested, self.max_model_len)

    @count_grpc_requests
    async def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        if not self._key_ok(context):
            log.info("[%s] Generate refused: no or an unknown API key", request_id)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required: 'authorization: Bearer KEY'"
            )
        try:
            sampling = sampling_with_defaults(request.sampling)
            prompt_ids = self._prompt_ids(request)
            self._validate(request, prompt_ids, sampling)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        http_tracing.record_gen_ai_request("generate", self.model_name, sampling, prompt_ids, request_id)
        try:
            async for reply in self._samples(request_id, prompt_ids, sampling, request.n or 1):
                yield reply
        except GenerationError as exc:
            log.warning("[%s] failed: %s", request_id, exc)
            await context.abort(GRPC_STATUS[exc.kind], str(exc))

    async def _samples(
        self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, n: int
    ) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        """The replies of ``n`` samples (fanout.py: they share the prompt's KV), interleaved."""
        if n == 1:
            async for reply in self._replies(request_id, 0, prompt_ids, sampling, self.backend):
                yield reply
            return
        log.info("[%s] %d samples", request_id, n)
        shared = SharedPrompt(self.backend)
        samples = [
            self._replies(request_id, j, prompt_ids, sample_sampling(sampling, j, ranked=False), shared)
            for j in range(n)
        ]
        merged = merge(samples)
        try:
            async for _, reply in merged:
                yield reply
        finally:
            await merged.aclose()

    async def _replies(
        self,
        request_id: str,
        index: int,
        prompt_ids: list[int],
        sampling: SamplingParams,
        backend: GenerationBackend,
    ) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        """One sample's replies; the backend's request id is ``request_id``, or with n > 1
        ``request_id-index``."""
        detok = IncrementalDetokenizer(self.tokenizer)
        completion_tokens = 0
        backend_id = request_id if backend is self.backend else f"{request_id}-{index}"
        async for chunk in backend.generate(backend_id, prompt_ids, sampling):
            completion_tokens += len(chunk.token_ids)
            reply = coordinator_pb2.GenerateResponse(
                request_id=request_id,
                index=index,
                token_ids=chunk.token_ids,
                text=detok.add(chunk.token_ids) + (detok.flush() if chunk.finished else ""),
                finished=chunk.finished,
                finish_reason=chunk.finish_reason or "",
                logprobs=logprobs_to_proto(chunk.logprobs),
                prompt_logprobs=prompt_logprobs_to_proto(chunk.prompt_logprobs),
            )
            if chunk.finished:
                reply.usage.CopyFrom(
                    common_pb2.Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens)
                )
                http_tracing.record_gen_ai_usage(completion_tokens, chunk.finish_reason)
            yield reply
