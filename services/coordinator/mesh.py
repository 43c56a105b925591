"""The coordinator's backend: drives one request through a prefill and a decode instance.

Flow (decode pulls): Prefill on a prefill instance -> first token (streamed at once: the worker sends
it ahead of registering the KV handle, ``PrefillCall.first_token``) -> KV handle -> Decode on a
decode instance with the handle -> stream the rest.

Failures: KV_UNAVAILABLE, or a prefill or decode instance that fails or dies, starts a new attempt
on other instances, at most ``max_retry`` times. An attempt continues from what the client already
has: its prompt is the original prompt plus every token already sent, so a decode instance that dies
mid-stream is replaced by prefilling that on another instance (migration) and the client sees one
unbroken stream (at temperature 0, the same text as an uninterrupted run; a seeded sampler restarts
its random stream at the migration point). Logprobs travel in the chunk of their token, so those of
tokens already sent are neither repeated nor lost: a new attempt only produces the tokens after them.
Prompt logprobs come with the first token (from the prefill worker, or from the instance that
prefills the request itself); an attempt after the first token was sent does not ask for them again.

Prompts shorter than ``local_prefill_threshold`` tokens are prefilled by the decode instance itself
(conditional disaggregation). With only mixed instances healthy, a mixed instance serves it whole.
Each attempt decides all of this on one snapshot of the cluster view (``Router.snapshot``).
A request in a group sharing its prompt (``n`` > 1, ``backend.Affinity``) is prefilled where the
group's prompt already was (prefill, mixed, or the decode instance prefilling locally), over the
routing policy while that instance is healthy and untried, so that its prefix cache serves the prompt.

Workers are called through ``pdmesh.rpc.worker_client`` (plain dataclasses; a failure is a
``WorkerError`` with a kind): a bad request (INVALID_ARGUMENT), a timeout (DEADLINE_EXCEEDED) or a
failure no attempt would mend (UPSTREAM_FAILED) ends the request; any other kind starts a new attempt.

Channels: one per worker address, opened on first use. When a view no longer lists an address, its
channel is closed as soon as no call uses it (at once, or when the last call on it ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pdmesh.config import CoordinatorConfig
from pdmesh.errors import ErrorKind, WorkerError
from pdmesh.generation import SamplingParams
from pdmesh.membership import ClusterViewData, InstanceInfoData, Role
from pdmesh.observability import coordinator_metrics as metrics
from pdmesh.rpc.client import open_channel
from pdmesh.rpc.worker_client import PrefillResult, WorkerClient
from services.coordinator.admission import AdmissionGate
from services.coordinator.backend import Affinity, GenerationChunk, GenerationError
from services.coordinator.routing import Router, RoutingSnapshot

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)


class _Retry(Exception):
    """This attempt lost its KV or its instance; start another on other instances."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause  # retries_total's label: a worker error's cause (pdmesh.rpc.worker_client)


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    deadline: float
    sent: list[int] = field(default_factory=list)  # tokens the client already has
    attempt: int = 0
    tried: set[str] = field(default_factory=set)
    affinity: Affinity | None = None  # a group sharing this prompt: where its KV was computed

    @property
    def attempt_id(self) -> str:
        """Worker-side id: a retry never collides with what an earlier attempt left behind."""
        return self.request_id if self.attempt == 0 else f"{self.request_id}-r{self.attempt}"

    def continuation(self) -> tuple[list[int], SamplingParams]:
        """The prompt and sampling that continue this request from what was already sent."""
        remaining = self.sampling.max_tokens - len(self.sent)
        sampling = replace(self.sampling, max_tokens=remaining)
        if self.sent:  # the client has the prompt logprobs already (they came with the first token)
            sampling.prompt_logprobs = None
        if self.sent and sampling.structured is not None:  # structured outputs: resume after what was sent
            resumed = sampling.structured.resume_tokens + len(self.sent)
            sampling.structured = replace(sampling.structured, resume_tokens=resumed)
        return self.prompt_ids + self.sent, sampling


class MeshBackend:
    """A ``GenerationBackend`` over the worker mesh."""

    def __init__(self, router: Router, config: CoordinatorConfig) -> None:
        self.router = router
        self.config = config
        self.gate = AdmissionGate(config.max_inflight, config.max_queue, config.queue_timeout_s)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._clients: dict[str, WorkerClient] = {}  # one per channel: its stubs are made once
        self._calls: Counter = Counter()  # address -> calls in progress on its channel
        self._listed: set[str] | None = None  # the addresses in the latest view seen (None: none yet)
        self._closing: set[asyncio.Task] = set()
        self._overflowing: Counter = Counter()  # decode instance id -> overflow prompts before token 1

    def ready(self) -> bool:
        return self.router.ready()

    def _client(self, instance: InstanceInfoData) -> WorkerClient:
        client = self._clients.get(instance.address)
        if client is None:
            channel = self._channels[instance.address] = open_channel(instance.address)
            client = self._clients[instance.address] = WorkerClient.over(channel)
        return client

    @contextlib.contextmanager
    def _calling(self, instance: InstanceInfoData) -> Iterator[None]:
        """Marks the instance's channel in use for the duration of one call."""
        self._hold(instance)
        try:
            yield
        finally:
            self._let_go(instance)

    def _hold(self, instance: InstanceInfoData) -> None:
        self._calls[instance.address] += 1

    def _let_go(self, instance: InstanceInfoData) -> None:
        """One call on the instance's channel ended; the last one closes it if the view dropped it."""
        self._calls[instance.address] -= 1
        if not self._calls[instance.address]:
            del self._calls[instance.address]
            if self._listed is not None and instance.address not in self._listed:
                self._close_channel(instance.address)

    def _forget_departed(self, view: ClusterViewData) -> None:
        """Closes the channels of addresses this view no longer lists and no call uses."""
        listed = {i.address for i in view.instances}
        if listed == self._listed:
            return
        self._listed = listed
        for address in [a for a in self._channels if a not in listed and not self._calls[a]]:
            self._close_channel(address)

    def _close_channel(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        self._clients.pop(address, None)
        if channel is not None:
            log.debug("closing the channel to %s: no longer in the cluster view", address)
            task = asyncio.ensure_future(channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        self._clients = {}
        for channel in channels:
            await channel.close()
        if self._closing:
            await asyncio.wait(self._closing)

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        affinity: Affinity | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        if not self.router.snapshot().ready():
            raise _unservable()
        arrived = time.monotonic()
        async with self.gate.admit():
            request = _Request(
                request_id, prompt_ids, sampling, time.monotonic() + self.config.request_timeout_s
            )
            request.affinity = affinity
            async for chunk in metrics.observe_stream(self._with_retries(request), arrived):
                yield chunk

    async def _with_retries(self, request: _Request) -> AsyncIterator[GenerationChunk]:
        while True:
            try:
                async for chunk in self._attempt(request):
                    request.sent.extend(chunk.token_ids)
                    yield chunk
                return
            except _Retry as why:
                request.attempt += 1
                if request.attempt > self.config.max_retry:
                    raise GenerationError(
                        f"request failed after {request.attempt} attempts; last: {why}", ErrorKind.UNAVAILABLE
                    ) from None
                log.warning("[%s] attempt %d failed (%s); retrying", request.request_id, request.attempt, why)
                metrics.RETRIES.labels(why.cause).inc()
                if request.sent:  # the client is mid-stream: the next attempt continues it elsewhere
                    metrics.MIGRATIONS.inc()

    async def _attempt(self, request: _Request) -> AsyncIterator[GenerationChunk]:
        prompt_ids, sampling = request.continuation()
        snapshot = self.router.snapshot()  # one view for every decision of this attempt
        self._forget_departed(snapshot.view)
        if not snapshot.ready():
            raise _unservable()
        if not snapshot.can_disaggregate():
            mixed = _pick(snapshot, Role.MIXED, request, computes_prompt=True)
            async for chunk in self._stream(mixed, request, prompt_ids, sampling):
                yield chunk
            return
        local = len(prompt_ids) < self.config.local_prefill_threshold
        decode = _pick(snapshot, Role.DECODE, request, computes_prompt=local)
        if not local and self._overflows(snapshot, request, prompt_ids, decode):
            async for chunk in self._overflow(decode, request, prompt_ids, sampling):
                yield chunk
            return
        if local:
            async for chunk in self._stream(decode, request, prompt_ids, sampling):
                yield chunk
            return
        prefill = _pick(snapshot, Role.PREFILL, request, prompt_ids, computes_prompt=True)
        prefilled, early = None, False
        # closed with this attempt: a client gone after token 1 ends the call at once (the worker frees)
        async with contextlib.aclosing(self._prefill(prefill, request, prompt_ids, sampling)) as items:
            async for item in items:
                if isinstance(item, PrefillResult):
                    prefilled = item
                else:
                    early = True
                    yield item  # the first token, streamed while its KV handle is being registered
        if not early:
            yield GenerationChunk(
                [prefilled.first_token],
                prefilled.finished,
                prefilled.finish_reason,
                prefilled.logprobs,
                prefilled.prompt_logprobs,
            )
        if prefilled.finished:
            return
        async for chunk in self._stream(decode, request, prompt_ids, sampling, prefilled):
            yield chunk

    async def _prefill(
        self, instance, request: _Request, prompt_ids, sampling
    ) -> AsyncIterator[GenerationChunk | PrefillResult]:
        """The first token's chunk as soon as the worker sends it ahead of its reply (when it does),
        then the ``PrefillResult`` with the KV handle."""
        time_left = _remaining(request.deadline)
        timeout = min(self.config.first_token_timeout_s, time_left)
        self.router.inflight[instance.instance_id] += 1
        call = None
        try:
            with self._calling(instance):
                call = self._client(instance).start_prefill(
                    request.attempt_id, prompt_ids, sampling, time_left, timeout
                )
                early = await call.first_token()
                if early is not None:
                    yield GenerationChunk([early])
                yield await call.result()
        except asyncio.CancelledError:
            await self._abort(instance, request.attempt_id)
            raise
        except WorkerError as exc:
            request.tried.add(instance.instance_id)
            raise _settle(exc, instance, "prefill") from exc
        finally:
            if call is not None:
                call.cancel()  # left before the reply (the client went away): the worker frees the KV
            self.router.inflight[instance.instance_id] -= 1

    def _overflows(
        self, snapshot: RoutingSnapshot, request: _Request, prompt_ids: list[int], decode: InstanceInfoData
    ) -> bool:
        """Whether ``decode`` prefills this prompt itself because every prefill instance is busy: the
        prompt is within ``overflow_prefill_tokens`` and ``decode`` is not prefilling another one."""
        limit = self.config.overflow_prefill_tokens
        if not limit or len(prompt_ids) > limit or request.affinity is not None:
            return False
        return not self._overflowing[decode.instance_id] and snapshot.prefill_busy(request.tried)

    async def _overflow(
        self, decode: InstanceInfoData, request: _Request, prompt_ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        """The request whole on ``decode`` (it prefills the prompt), counted as overflowing there until
        its first token."""
        log.info(
            "[%s] every prefill instance is busy: %s prefills the %d-token prompt itself",
            request.request_id,
            decode.instance_id,
            len(prompt_ids),
        )
        metrics.OVERFLOW_PREFILLS.labels(decode.instance_id).inc()
        self._overflowing[decode.instance_id] += 1
        prefilling = True
        try:
            async for chunk in self._stream(decode, request, prompt_ids, sampling):
                if prefilling:
                    prefilling = False
                    self._overflowing[decode.instance_id] -= 1
                yield chunk
        finally:
            if prefilling:
                self._overflowing[decode.instance_id] -= 1

    async def _stream(
        self, instance, request: _Request, prompt_ids, sampling, prefilled: PrefillResult | None = None
    ) -> AsyncIterator[GenerationChunk]:
        """Streams a Decode call that continues ``prefilled``, or without it the whole (continued)
        request on one instance, which prefills it itself; a failure raises _Retry (migration) or
        GenerationError."""
        time_left = _remaining(request.deadline)
        stream = self._client(instance).decode(request.attempt_id, prompt_ids, sampling, time_left, prefilled)
        # a worker prefilling the request itself must produce its first token in time, as a prefill must
        first_timeout = None
        if prefilled is None:
            first_timeout = min(self.config.first_token_timeout_s, _remaining(request.deadline))
        self.router.inflight[instance.instance_id] += 1
        self._hold(instance)
        try:
            async for chunk in _first_in_time(stream, first_timeout, instance):
                yield GenerationChunk(
                    chunk.token_ids,
                    chunk.finished,
                    chunk.finish_reason,
                    chunk.logprobs,
                    chunk.prompt_logprobs,
                )
                if chunk.finished:
                    return
        except WorkerError as exc:
            request.tried.add(instance.instance_id)
            raise _settle(exc, instance, "decode") from exc
        finally:
            self.router.inflight[instance.instance_id] -= 1
            stream.cancel()  # the client went away or we are done: the worker aborts and frees blocks
            self._let_go(instance)
        request.tried.add(instance.instance_id)
        raise _Retry(f"decode stream from {instance.instance_id} ended without finishing", "stream_ended")

    async def _abort(self, instance: InstanceInfoData, request_id: str) -> None:
        with contextlib.suppress(WorkerError, asyncio.CancelledError), self._calling(instance):
            await self._client(instance).abort(request_id)


def _unservable() -> GenerationError:
    return GenerationError("no healthy prefill and decode instances", ErrorKind.UNAVAILABLE, retry_after_s=1)


def _pick(
    snapshot: RoutingSnapshot,
    role: Role,
    request: _Request,
    prompt_ids: list[int] | None = None,
    computes_prompt: bool = False,
) -> InstanceInfoData:
    """An instance of ``role``; the one that ``computes_prompt`` follows the request's affinity (the
    group sharing its prompt goes where the prompt's KV already is) and records itself there."""
    affinity = request.affinity if computes_prompt else None
    prefer = affinity.instances.get(role.value) if affinity is not None else None
    instance = snapshot.pick(role, exclude=request.tried, prompt_ids=prompt_ids, prefer=prefer)
    if instance is None:
        raise GenerationError(f"no healthy {role.value} instance", ErrorKind.UNAVAILABLE, retry_after_s=1)
    if affinity is not None:
        affinity.instances[role.value] = instance.instance_id
    metrics.ROUTE_CHOICES.labels(role.value, instance.instance_id).inc()
    return instance


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise GenerationError("request timed out", ErrorKind.DEADLINE_EXCEEDED)
    return remaining


async def _first_in_time(stream, timeout: float | None, instance: InstanceInfoData) -> AsyncIterator:
    """The stream's chunks, the first within ``timeout`` seconds (None: no limit) or DEADLINE_EXCEEDED."""
    messages = aiter(stream)
    if timeout is not None:
        try:
            yield await asyncio.wait_for(anext(messages), timeout)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise GenerationError(
                f"no first token within {timeout:g} s at {instance.instance_id}", ErrorKind.DEADLINE_EXCEEDED
            ) from None
    async for message in messages:
        yield message


def _settle(exc: WorkerError, instance: InstanceInfoData, phase: str) -> Exception:
    """What a failed worker call means for the request: a bad request, a timeout or a failure that
    another attempt would not mend end it (GenerationError); any other kind starts a new attempt."""
    where = instance.instance_id
    if exc.kind == ErrorKind.INVALID_ARGUMENT:
        return GenerationError(exc.message or "invalid request", ErrorKind.INVALID_ARGUMENT)
    if exc.kind == ErrorKind.DEADLINE_EXCEEDED:
        return GenerationError(f"{phase} timed out at {where}", ErrorKind.DEADLINE_EXCEEDED)
    if exc.kind == ErrorKind.UPSTREAM_FAILED:
        return GenerationError(f"{phase} failed at {where}: {exc.message}", exc.kind)
    return _Retry(f"{phase} at {where}: {exc.cause.upper()} {exc.message}", exc.cause)
