"""The HTTP front's requests with several choices: a list of prompts (``/v1/completions``), ``n`` > 1,
``best_of`` (both endpoints), streamed or not, as vLLM's OpenAI server answers them.

- Each prompt i and sample j is one sequence, run as a one-choice request runs (``OpenAIServer``'s
  ``Job``), and answers choice ``i * n + j`` (vLLM's numbering). A list of token ids is one prompt; a
  list of strings, or of token-id lists, is a batch.
- ``best_of`` (at least ``n``; unset: ``n``) samples that many sequences per prompt and answers the
  ``n`` with the highest cumulative logprob (the sum of their tokens' logprobs), best first; larger
  than ``n`` it cannot be streamed (400: a stream would show samples then dropped). The samples of a
  prompt share its KV (``fanout.SharedPrompt``).
- ``usage``: the prompt tokens of each prompt once, the completion tokens of every choice answered.
- Streaming: the chunks of all choices interleave as they come, each carrying its choice's ``index``
  (chat: each choice starts with its own role chunk); with ``include_usage`` one usage chunk ends the
  stream. A sequence that fails mid-stream ends the stream with its error event (the others are
  cancelled), then ``[DONE]``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pdmesh.observability.coordinator_metrics import Outcome
from services.coordinator import openai_api as api
from services.coordinator.fanout import SharedPrompt, all_or_cancel, merge, sample_sampling, sequences_error
from services.coordinator.http_errors import ApiError
from services.coordinator.http_util import ClientGone, SSEResponse, aclose, sse, unless_disconnected

if TYPE_CHECKING:
    from services.coordinator.http_app import OpenAIServer
    from services.coordinator.http_job import Job
    from services.coordinator.text_stream import TextStream

log = logging.getLogger(__name__)


def counts(body: api.SamplingRequest) -> tuple[int, int]:
    """(n, best_of) of a request; best_of defaults to n."""
    n = body.n or 1
    best_of = getattr(body, "best_of", None) or n
    return n, best_of


def fans_out(body: api.SamplingRequest, prompts: int) -> bool:
    """Whether the request needs more than one sequence (else the one-choice path serves it)."""
    n, best_of = counts(body)
    return prompts > 1 or n > 1 or best_of > 1


def check(body: api.SamplingRequest, prompts: int) -> None:
    """The 400s of n, best_of and batch size."""
    n, best_of = counts(body)
    if best_of < n:
        raise ApiError(f"best_of ({best_of}) must be greater than or equal to n ({n})", param="best_of")
    if body.stream and best_of > n:
        raise ApiError("best_of greater than n cannot be streamed", param="best_of")
    why = sequences_error(prompts, best_of)
    if why is not None:
        raise ApiError(why, param="n" if prompts == 1 else "prompt")


async def respond(
    server: OpenAIServer, body: api.SamplingRequest, jobs: list[Job], request: Request
) -> Response:
    """Answers the request whose prepared jobs (one per prompt) are ``jobs``: the one-choice path
    when one sequence does, else a ``FanOut``."""
    if not fans_out(body, len(jobs)):
        return await server.respond(jobs[0], request)
    fan = FanOut(server, body, jobs)
    request.state.outcome = fan.outcome
    return await fan.respond(request)


async def _first(generator) -> Any:
    try:
        return await anext(generator)
    except StopAsyncIteration:
        return None


class FanOut:
    """One request's sequences (``jobs[i][j]``: prompt i, sample j) and how their answers combine."""

    def __init__(self, server: OpenAIServer, body: api.SamplingRequest, prompts: list[Job]) -> None:
        """``prompts``: one prepared job per prompt, which its samples copy."""
        check(body, len(prompts))
        self.server, self.request_id = server, prompts[0].request_id
        self.n, self.best_of = counts(body)
        self.response_id = prompts[0].response_id
        self.outcome = Outcome()
        self.jobs: list[list[Job]] = []
        for i, base in enumerate(prompts):
            shared = SharedPrompt(server.backend)
            self.jobs.append(
                [
                    replace(
                        base,
                        response_id=f"{self.response_id}-{i * self.best_of + j}",  # the backend's id
                        sampling=sample_sampling(base.sampling, j, ranked=self.best_of > self.n),
                        outcome=Outcome(),
                        backend=shared,
                    )
                    for j in range(self.best_of)
                ]
            )
        first = self.jobs[0][0]
        self.parent = replace(first, response_id=self.response_id, outcome=self.outcome, backend=None)

    @property
    def flat(self) -> list[Job]:
        return [job for jobs in self.jobs for job in jobs]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(jobs[0].prompt_ids) for jobs in self.jobs)

    async def respond(self, request: Request) -> Response:
        """The combined answer: JSON, or server-sent events when the request streams."""
        log.info(
            "[%s] %s: %d prompts x %d samples (n %d)",
            self.request_id,
            self.response_id,
            len(self.jobs),
            self.best_of,
            self.n,
        )
        try:
            if self.parent.stream:
                return await self._start_stream(request)
            results = await unless_disconnected(
                request, all_or_cancel([self.server._collect(job) for job in self.flat])
            )
        except ClientGone:
            log.info("[%s] client disconnected; generation cancelled", self.request_id)
            return Response(status_code=499)
        body = self._full_response(results)
        self.outcome.finish(
            body.choices[0].finish_reason, body.usage.prompt_tokens, body.usage.completion_tokens
        )
        log.info("[%s] done: %d choices, usage %s", self.request_id, len(body.choices), body.usage)
        return JSONResponse(body.model_dump(mode="json"))

    def _full_response(self, results: list[tuple[str, TextStream]]):
        """The first choice's one-choice response (its other fields kept) with every choice and the
        request's usage."""
        responses, choices, completion_tokens = [], [], 0
        for i, jobs in enumerate(self.jobs):
            ranked = list(zip(jobs, results[i * self.best_of : (i + 1) * self.best_of], strict=True))
            if self.best_of > self.n:  # the n most likely samples, best first
                ranked.sort(key=lambda sample: sample[1][1].cumulative_logprob(), reverse=True)
            for j, (job, (text, stream)) in enumerate(ranked[: self.n]):
                responses.append(self.server._full_response(job, text, stream))
                choices.append(responses[-1].choices[0].model_copy(update={"index": i * self.n + j}))
                completion_tokens += stream.completion_tokens
        usage = api.Usage.of(self.prompt_tokens, completion_tokens)
        return responses[0].model_copy(update={"id": self.response_id, "choices": choices, "usage": usage})

    async def _start_stream(self, request: Request) -> Response:
        """Waits for every sequence's first chunk (early errors keep their status), then streams."""
        generators = []
        try:
            generators = [self.server._generate(job) for job in self.flat]
            firsts = await unless_disconnected(request, all_or_cancel([_first(g) for g in generators]))
        except BaseException:
            for generator in generators:
                await aclose(generator, self.request_id)
            raise
        return SSEResponse(self._events(firsts, generators), headers={"Cache-Control": "no-cache"})

    async def _events(self, firsts: list, generators: list):
        streams = [
            self.server._events(job, first, generator)
            for job, first, generator in zip(self.flat, firsts, generators, strict=True)
        ]
        merged = merge(streams)
        failed: Job | None = None
        try:
            async for index, payload in merged:
                event, error = self._reindexed(index, payload)
                if event is not None:
                    yield event
                if error:
                    failed = self.flat[index]
                    break
        finally:
            await merged.aclose()
            for generator in generators:
                await aclose(generator, self.request_id)
        if failed is not None:
            self.outcome.status = failed.outcome.status
        else:
            self._finish_streamed()
            if self.parent.include_usage:
                usage = api.Usage.of(self.outcome.prompt_tokens, self.outcome.completion_tokens)
                yield sse(self.server._usage_chunk(self.parent, usage))
        yield sse("[DONE]")

    def _reindexed(self, index: int, payload: str) -> tuple[str | None, bool]:
        """A sequence's event as the request's (its id and choice index), and whether it is an error
        event; None for what the combined stream answers once (a sequence's usage chunk, [DONE])."""
        data = payload[len("data: ") :].strip()
        if data == "[DONE]":
            return None, False
        event = json.loads(data)
        if "error" in event:
            return payload, True
        if not event.get("choices"):
            return None, False
        event["id"] = self.response_id
        for choice in event["choices"]:
            choice["index"] = index
        return sse(event), False

    def _finish_streamed(self) -> None:
        jobs = self.flat
        completion_tokens = sum(job.outcome.completion_tokens for job in jobs)
        self.outcome.finish(jobs[0].outcome.finish_reason, self.prompt_tokens, completion_tokens)
        log.info("[%s] streamed %d choices, %d tokens", self.request_id, len(jobs), completion_tokens)
