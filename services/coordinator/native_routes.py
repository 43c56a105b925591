"""MindIE's ``POST /infer`` and TGI's ``POST /generate`` and ``/generate_stream`` over the same backend
as the OpenAI routes (native_api.py holds the shapes; docs/api.md the fields).

- The prompt is ``inputs`` as text (TGI: with the tokenizer's special tokens unless
  ``add_special_tokens`` is false); ``truncate`` keeps its last N tokens. ``max_new_tokens`` defaults
  to 20 (TGI's and MindIE's default), lowered to the context left after the prompt.
- ``finish_reason``: ``length``, ``eos_token`` (an end-of-sequence or stop token) or
  ``stop_sequence`` (a stop string, cut from the text, as MindIE does). ``return_full_text`` puts
  ``inputs`` before ``generated_text``.
- TGI streams one event per generated token (``index`` from 1, ``token`` with its id, text, logprob
  when ``details`` is asked, and whether it is special); MindIE one event per step of the backend
  (``token.id`` lists its ids) with ``prefill_time``/``decode_time`` in milliseconds. The last event
  carries ``generated_text`` (and ``details`` when asked); neither ends with ``[DONE]``.
- Errors are OpenAI error objects, as on the other routes; a failure after a stream started is an
  ``error`` event ending the stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pdmesh import structured as constraints
from pdmesh.errors import ErrorKind
from pdmesh.generation import SamplingParams, StructuredOutput
from services.coordinator import http_schema
from services.coordinator import native_api as native
from services.coordinator import openai_api as api
from services.coordinator.backend import GenerationChunk, GenerationError
from services.coordinator.http_errors import ApiError, generation_error_body
from services.coordinator.http_job import Job
from services.coordinator.http_util import ClientGone, SSEResponse, aclose, chain, unless_disconnected
from services.coordinator.limits import LengthError, completion_budget
from services.coordinator.text_stream import TextStream

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 20
router = APIRouter()


@dataclass
class Step:
    """Tokens fed to the text stream at once and the text they released."""

    ids: list[int]
    text: str
    logprobs: list[float | None]


@dataclass
class Run:
    """One native request on its way through the backend."""

    server: object  # http_app.OpenAIServer
    job: Job
    inputs: str
    params: native.NativeParameters
    stream: TextStream
    started: float = field(default_factory=time.monotonic)
    texts: list[str] = field(default_factory=list)
    last_id: int = 0  # the last token generated

    @property
    def finish_reason(self) -> str:
        if self.stream.stopped_at_string:
            return "stop_sequence"
        return {"stop": "eos_token"}.get(self.stream.finish_reason or "", self.stream.finish_reason or "")

    def generated_text(self) -> str:
        text = "".join(self.texts)
        return self.inputs + text if self.params.return_full_text else text

    def feed(self, chunk: GenerationChunk) -> list[Step]:
        """One step per token (TGI's events), stopping where the text stream ends."""
        steps, last = [], len(chunk.token_ids) - 1
        for i, token in enumerate(chunk.token_ids):
            lp = chunk.logprobs[i] if chunk.logprobs and i < len(chunk.logprobs) else None
            end = chunk.finished and i == last
            piece = GenerationChunk([token], end, chunk.finish_reason if end else None, [lp] if lp else None)
            text, self.last_id = self.stream.feed(piece), token
            self.texts.append(text)
            steps.append(Step([token], text, [lp[0] if lp else None]))
            if self.stream.done:
                break
        if chunk.finished and not chunk.token_ids and not self.stream.done:
            self.texts.append(self.stream.feed(chunk))
        return steps


def _prepare(server, body: native.NativeRequest, request: Request, add_special: bool, stream: bool) -> Run:

    params = body.parameters
    ids = server.tokenizer.encode(body.inputs, add_special_tokens=add_special)
    if params.truncate is not None:
        ids = ids[-params.truncate :]
    try:
        if params.max_new_tokens is None:
            budget = min(DEFAULT_MAX_NEW_TOKENS, completion_budget(len(ids), None, server.max_model_len))
        else:
            budget = completion_budget(
                len(ids), params.max_new_tokens, server.max_model_len, "max_new_tokens"
            )
    except LengthError as exc:
        param = "inputs" if exc.field == "prompt" else "parameters.max_new_tokens"
        code = "context_length_exceeded" if exc.context_exceeded else None
        raise ApiError(str(exc), param=param, code=code) from exc
    sampling = SamplingParams(
        temperature=(params.temperature or 1.0) if params.samples() else 0.0,
        top_p=1.0 if params.top_p is None else params.top_p,
        top_k=-1 if params.top_k is None else params.top_k,
        repetition_penalty=1.0 if params.repetition_penalty is None else params.repetition_penalty,
        frequency_penalty=params.frequency_penalty or 0.0,
        seed=params.seed,
        max_tokens=budget,
        ignore_eos=bool(params.ignore_eos),
        logprobs=1 if params.details else 0,  # each token's logprob in details
    )
    sampling.structured = _grammar(params.grammar)
    stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
    job = Job(
        request_id=request.state.request_id,
        response_id=api.new_id("native"),
        prompt_ids=ids,
        sampling=sampling,
        top_logprobs=None,
        stops=[s for s in stops if s],
        include_usage=False,
        chat=False,
        stream=stream,
        created=api.now(),
    )
    request.state.outcome = job.outcome
    return Run(server, job, body.inputs, params, server._text_stream(job))


def _grammar(grammar: native.TGIGrammar | None) -> StructuredOutput | None:
    """TGI's grammar as a structured-output constraint, compiled here so that a bad one is a 400."""
    if grammar is None:
        return None
    if grammar.type == "regex":
        if not isinstance(grammar.value, str):
            raise ApiError(
                "a regex grammar's value is the pattern (a string)", param="parameters.grammar.value"
            )
        structured = StructuredOutput("regex", grammar.value)
    else:
        value = grammar.value
        structured = StructuredOutput("json_schema", value if isinstance(value, str) else json.dumps(value))
    try:
        constraints.check(structured)
    except ValueError as exc:
        raise ApiError(str(exc), param="parameters.grammar.value") from None
    return structured


def _special_ids(server) -> set[int]:
    tokens = server.tokenizer.backend.get_added_tokens_decoder()
    return {i for i, t in tokens.items() if t.special} | set(server.tokenizer.eos_token_ids)


def _token(step: Step, special: set[int]) -> native.TGIToken:
    """A TGI token: a step of one token."""
    token = step.ids[0]
    return native.TGIToken(id=token, text=step.text, logprob=step.logprobs[0], special=token in special)


async def _collect(run: Run) -> list[Step]:
    steps: list[Step] = []
    generator = run.server._generate(run.job)
    try:
        async for chunk in generator:
            steps += run.feed(chunk)
            if run.stream.done:
                break
    finally:
        await aclose(generator, run.job.request_id)
    if not run.stream.done:
        raise GenerationError("generation ended without finishing", ErrorKind.UPSTREAM_FAILED)
    return steps


def _finished(run: Run) -> None:
    job, stream = run.job, run.stream
    job.outcome.finish(stream.finish_reason, len(job.prompt_ids), stream.completion_tokens)
    log.info("[%s] done: %s, %d tokens", job.request_id, run.finish_reason, stream.completion_tokens)


async def _answer(run: Run, request: Request, tgi: bool) -> Response:
    try:
        steps = await unless_disconnected(request, _collect(run))
    except ClientGone:
        log.info("[%s] client disconnected; generation cancelled", run.job.request_id)
        return Response(status_code=499)
    _finished(run)
    text, stream, params = run.generated_text(), run.stream, run.params
    if not params.details:
        return JSONResponse({"generated_text": text})
    common = {"finish_reason": run.finish_reason, "generated_tokens": stream.completion_tokens}
    common["seed"] = params.seed
    if tgi:
        special = _special_ids(run.server)
        tokens = [_token(s, special) for s in steps]
        body = native.TGIResponse(generated_text=text, details=native.TGIDetails(**common, tokens=tokens))
    else:
        body = native.InferResponse(generated_text=text, details=native.InferDetails(**common))
    return JSONResponse(body.model_dump(mode="json"))


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _last(run: Run, tgi: bool) -> dict:
    """What the last event adds: the whole text and, when asked, the details."""
    extra: dict = {"generated_text": run.generated_text()}
    if run.params.details:
        details = {"finish_reason": run.finish_reason, "generated_tokens": run.stream.completion_tokens}
        details["seed"] = run.params.seed
        if tgi:
            details["input_length"] = len(run.job.prompt_ids)
        extra["details"] = details
    return extra


def _tgi_events(run: Run, steps: list[Step], special: set[int], index: int) -> list[dict]:
    """One event per token; a last chunk without tokens ends on an empty special token."""
    if not steps and run.stream.done:
        steps = [Step([run.last_id], "", [None])]
        special = special | set(steps[0].ids)
    events = []
    for i, step in enumerate(steps, start=index + 1):
        token = _token(step, special).model_dump(mode="json")
        events.append(
            {"index": i, "token": token, "top_tokens": None, "generated_text": None, "details": None}
        )
    return events


def _infer_event(steps: list[Step], ms: float, first: bool) -> dict:
    """One event per backend step: its token ids and text, and how long it took."""
    token = {"id": [t for s in steps for t in s.ids], "text": "".join(s.text for s in steps)}
    return {"prefill_time": ms if first else None, "decode_time": None if first else ms, "token": token}


async def _events(run: Run, first: GenerationChunk | None, generator, tgi: bool) -> AsyncIterator[str]:
    special, index, last_at = _special_ids(run.server), 0, None
    try:
        async for chunk in chain(first, generator):
            steps = run.feed(chunk)
            if tgi:
                events = _tgi_events(run, steps, special, index)
                index += len(events)
            else:
                now = time.monotonic()
                ms = round(1000 * (now - (last_at or run.started)), 2)
                events, last_at = [_infer_event(steps, ms, last_at is None)], now
            if run.stream.done and events:
                events[-1].update(_last(run, tgi))
            for event in events:
                yield _event(event)
            if run.stream.done:
                break
        if not run.stream.done:
            raise GenerationError("generation ended without finishing", ErrorKind.UPSTREAM_FAILED)
        _finished(run)
    except GenerationError as exc:
        status, body = generation_error_body(exc)
        log.warning("[%s] failed mid-stream (%d): %s", run.job.request_id, status, exc.message)
        run.job.outcome.status = str(status)
        yield _event(body)
    except asyncio.CancelledError:
        log.info("[%s] client disconnected; generation cancelled", run.job.request_id)
        raise
    finally:
        await aclose(generator, run.job.request_id)


async def _start_stream(run: Run, request: Request, tgi: bool) -> Response:
    """Waits for the first chunk (so that early errors keep their status), then streams."""
    generator = run.server._generate(run.job)
    try:
        first = await unless_disconnected(request, anext(generator))
    except StopAsyncIteration:
        first = None
    except BaseException:
        await aclose(generator, run.job.request_id)
        raise
    return SSEResponse(_events(run, first, generator, tgi), headers={"Cache-Control": "no-cache"})


async def _serve(body: native.NativeRequest, request: Request, stream: bool, tgi: bool) -> Response:
    server = request.app.state.server
    add_special = body.add_special_tokens if isinstance(body, native.TGIRequest) else True
    run = _prepare(server, body, request, add_special, stream)
    try:
        return await (_start_stream(run, request, tgi) if stream else _answer(run, request, tgi))
    except ClientGone:
        log.info("[%s] client disconnected; generation cancelled", run.job.request_id)
        return Response(status_code=499)


_INFER = http_schema.generation_responses(native.InferResponse, native.InferStreamEvent, done=False)
_TGI = http_schema.generation_responses(native.TGIResponse, native.TGIStreamEvent, done=False)


@router.post("/infer", response_model=None, responses=_INFER)
async def infer(body: native.InferRequest, request: Request) -> Response:
    return await _serve(body, request, body.stream, tgi=False)


@router.post("/generate", response_model=None, responses=_TGI)
async def generate(body: native.TGIRequest, request: Request) -> Response:
    return await _serve(body, request, bool(body.stream), tgi=True)


@router.post("/generate_stream", response_model=None, responses=_TGI)
async def generate_stream(body: native.TGIRequest, request: Request) -> Response:
    if body.stream is False:
        raise ApiError("/generate_stream always streams: send stream true or leave it out", param="stream")
    return await _serve(body, request, True, tgi=True)
