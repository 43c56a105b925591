"""The coordinator's OpenAI-compatible HTTP front (FastAPI).

``create_app(backend, model_name, tokenizer, max_model_len)`` serves ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or server-sent events) and
``GET /health`` (200 while ``backend.ready()``, else 503).

- Default ``max_tokens`` (and ``max_completion_tokens``): the context left after the prompt,
  ``max_model_len - prompt_tokens``, capped at ``limits.DEFAULT_MAX_TOKENS`` (256).
- ``stop`` strings end generation when the text contains one (trimmed from the output,
  ``finish_reason`` "stop"); while streaming, text that may begin a stop string is held back.
  A stop token (``stop_token_ids``, or an end-of-sequence id) that ends a request is not
  rendered as text; it still counts in ``usage.completion_tokens``.
- Chat messages need ``content`` (text, or text parts), except the assistant's (then empty).
  Token ids (a prompt's, ``stop_token_ids``) must be in the vocabulary. ``echo`` and prompt
  logprobs: echo.py.
  Lists of prompts, ``n`` > 1 and ``best_of``: http_fanout.py.
- Logprobs (``logprobs``/``top_logprobs`` in chat, ``logprobs`` in completions, 0..20 top tokens)
  come in OpenAI's shapes (logprobs.py); tokens past a stop string's cut have none (streamed, a token
  sent while its text was held back already had them).
- A stream sends one chunk per generated token (``_token_events``), with empty text while the token's
  text cannot be shown yet (a split multi-byte character, a possible stop string), as vLLM does. Not asked: ``"logprobs": null``.
- Errors are OpenAI error objects with a 4xx/5xx status (http_errors.py): FastAPI's 422 validation
  answers become 400s (415 for a body that is not JSON). A backend error after a stream has
  started becomes an ``error`` event, then ``[DONE]``. The OpenAPI schema (``/openapi.json``)
  documents every answer of each route, errors included; ``make fuzz`` tests the server against it.
- Every request has an id: the ``X-Request-Id`` header when the client sends one, else a new one;
  it is echoed in the response header and starts every log line (``[id]``).
- A client that goes away closes the backend's iterator (the backend cancels at its worker).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdmesh.errors import ErrorKind
from pdmesh.observability import http_tracing
from pdmesh.tokenizer import Tokenizer
from services.coordinator import echo, http_fanout, http_schema, logprobs, request_fields, structured_outputs
from services.coordinator import openai_api as api
from services.coordinator.api_keys import KeyLimits, KeyRing
from services.coordinator.backend import GenerationBackend, GenerationChunk, GenerationError
from services.coordinator.front_metrics import RequestMetricsMiddleware
from services.coordinator.http_auth import ApiKeyMiddleware
from services.coordinator.http_errors import ApiError, generation_error_body, install_error_handlers
from services.coordinator.http_job import Job
from services.coordinator.http_util import (
    ClientGone,
    RequestIdMiddleware,
    SSEResponse,
    aclose,
    chain,
    sse,
    unless_disconnected,
)
from services.coordinator.limits import LengthError, completion_budget
from services.coordinator.native_routes import router as native_router
from services.coordinator.text_stream import TextStream, TokenEntry, per_token
from services.coordinator.tokenize_api import router as tokenize_router
from services.coordinator.tools import ToolPlan, attach_tools, plan_tools
from services.coordinator.validation import check_token_ids

log = logging.getLogger(__name__)


class OpenAIServer:
    """Validation, generation and response shaping behind the routes."""

    def __init__(
        self, backend: GenerationBackend, model_name: str, tokenizer: Tokenizer, max_model_len: int
    ) -> None:
        self.backend = backend
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.token_texts = logprobs.TokenTexts(tokenizer)

    # -- validation ---------------------------------------------------------------------------------

    def check_common(self, body: api.SamplingRequest) -> None:
        if body.model is not None and body.model != self.model_name:
            raise ApiError(f"The model `{body.model}` does not exist.", 404, "model", "model_not_found")
        if body.stream_options is not None and not body.stream:
            raise ApiError("stream_options is only allowed when stream is true", param="stream_options")
        try:
            check_token_ids(body.stop_token_ids or (), self.tokenizer.vocab_size, "stop_token_ids")
        except ValueError as exc:
            raise ApiError(str(exc), param="stop_token_ids") from None
        logprobs.check_request(body)

    def completion_prompts(self, body: api.CompletionRequest) -> list[list[int]]:
        """The request's prompts: a string or a token-id list is one; a list of either, a batch."""
        prompts = body.prompt
        one = isinstance(prompts, str) or not isinstance(prompts[0], str | list)
        return [self.completion_prompt(body, prompt) for prompt in ([prompts] if one else prompts)]

    def completion_prompt(self, body: api.CompletionRequest, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        try:
            check_token_ids(prompt, self.tokenizer.vocab_size, "prompt token ids")
        except ValueError as exc:
            raise ApiError(str(exc), param="prompt") from None
        return list(prompt)

    def chat_prompt(self, body: api.ChatCompletionRequest, tools: ToolPlan | None = None) -> list[int]:
        messages = [self._message_dict(i, m) for i, m in enumerate(body.messages)]
        messages = request_fields.template_roles(messages, self.tokenizer.chat_template)
        try:
            extra = tools.template_vars() if tools else {}
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True, **extra)
        except jinja2.TemplateError as exc:
            raise ApiError(f"the chat template refused the messages: {exc}", param="messages") from exc
        except ValueError as exc:
            raise ApiError(str(exc), param="messages") from exc

    @staticmethod
    def _message_dict(index: int, message: api.ChatMessage) -> dict:
        data = message.model_dump(exclude_none=True)
        if isinstance(message.content, list):
            data["content"] = "".join(part.text or "" for part in message.content)
        elif message.content is None:
            # OpenAI's rule; templates would fail on the missing key with a message naming none.
            if message.role != "assistant":
                where = f"messages.{index}.content"
                raise ApiError(f"{where} is required in a {message.role!r} message", param=where)
            data["content"] = ""  # an assistant turn that only called tools has no text
        return data

    def prepare(self, body: api.SamplingRequest, prompt_ids: list[int], request_id: str, chat: bool) -> Job:
        """Validates lengths and sampling; picks the default max_tokens."""
        requested = body.requested_max_tokens()
        budget_name = (
            "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
        )
        prompt_param = "messages" if chat else "prompt"
        try:
            max_tokens = completion_budget(len(prompt_ids), requested, self.max_model_len, budget_name)
        except LengthError as exc:
            param = prompt_param if exc.field == "prompt" else exc.field
            code = "context_length_exceeded" if exc.context_exceeded else None
            raise ApiError(str(exc), param=param, code=code) from exc
        sampling = body.to_sampling(max_tokens)
        sampling.structured = structured_outputs.from_request(body)  # structured outputs
        try:
            sampling.validate()
        except ValueError as exc:
            raise ApiError(str(exc), param=str(exc).split(" ", 1)[0]) from exc
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        response_id = api.new_id("chatcmpl" if chat else "cmpl")
        stops, stream = body.stop_strings(), bool(body.stream)
        top = body.logprobs_top()
        return Job(
            request_id, response_id, prompt_ids, sampling, top, stops, include_usage, chat, stream, api.now()
        )

    # -- generation ---------------------------------------------------------------------------------

    def _text_stream(self, job: Job) -> TextStream:
        drop = set(job.sampling.stop_token_ids)
        if not job.sampling.ignore_eos:
            drop.update(self.tokenizer.eos_token_ids)
        stream = TextStream(self.tokenizer, job.stops, drop)
        return job.tools.stream(stream, job.stream) if job.tools else stream

    def _generate(self, job: Job) -> AsyncIterator[GenerationChunk]:
        if not self.backend.ready():
            raise GenerationError(
                "no healthy prefill and decode instances", ErrorKind.UNAVAILABLE, retry_after_s=1
            )
        log.info(
            "[%s] %s: %d prompt tokens, max_tokens %d%s",
            job.request_id,
            job.response_id,
            len(job.prompt_ids),
            job.sampling.max_tokens,
            ", streaming" if job.stream else "",
        )
        operation = "chat" if job.chat else "text_completion"
        http_tracing.record_gen_ai_request(
            operation, self.model_name, job.sampling, job.prompt_ids, job.response_id
        )
        backend = job.backend or self.backend
        return echo.watch(job, backend.generate(job.response_id, job.prompt_ids, job.sampling))

    def _logprobs(self, job: Job, entries: list[TokenEntry]) -> dict | None:
        return logprobs.render(self.token_texts, entries, job.top_logprobs, job.chat)

    async def _collect(self, job: Job) -> tuple[str, TextStream]:
        stream, parts = self._text_stream(job), []
        generator = self._generate(job)
        try:
            async for chunk in generator:
                parts.append(stream.feed(chunk))
                if stream.done:
                    break
        finally:
            await aclose(generator, job.request_id)
        if not stream.done:
            raise GenerationError("generation ended without finishing", ErrorKind.UPSTREAM_FAILED)
        return "".join(parts), stream

    async def respond(self, job: Job, request: Request) -> Response:
        """Runs ``job``: a JSON answer, or server-sent events when it asked to stream."""
        started = time.monotonic()
        try:
            if job.stream:
                return await self._start_stream(job, request)
            text, result = await unless_disconnected(request, self._collect(job))
        except ClientGone:
            log.info("[%s] client disconnected; generation cancelled", job.request_id)
            return Response(status_code=499)
        log.info(
            "[%s] done: %s, %d tokens in %.3fs",
            job.request_id,
            result.finish_reason,
            result.completion_tokens,
            time.monotonic() - started,
        )
        job.outcome.finish(result.finish_reason, len(job.prompt_ids), result.completion_tokens)
        http_tracing.record_gen_ai_usage(result.completion_tokens, result.finish_reason)
        return JSONResponse(self._full_response(job, text, result).model_dump(mode="json"))

    def _full_response(self, job: Job, text: str, result: TextStream):
        usage = api.Usage.of(len(job.prompt_ids), result.completion_tokens)
        reason, lps = result.finish_reason, self._logprobs(job, result.take_logprobs())
        if job.chat:
            message = result.message() if job.tools else api.AssistantMessage(content=text)
            choice = api.ChatChoice(message=message, logprobs=lps, finish_reason=reason)
            response = api.ChatCompletionResponse(
                id=job.response_id, created=job.created, model=self.model_name, choices=[choice], usage=usage
            )
            return echo.with_prompt_logprobs(job, self.token_texts, response)
        choice = echo.completion_choice(job, self.token_texts, text, lps, reason)
        return api.CompletionResponse(
            id=job.response_id, created=job.created, model=self.model_name, choices=[choice], usage=usage
        )

    async def _start_stream(self, job: Job, request: Request) -> Response:
        """Waits for the first chunk (so that early errors keep their status), then streams."""
        generator = self._generate(job)
        try:
            first = await unless_disconnected(request, anext(generator))
        except StopAsyncIteration:
            first = None
        except BaseException:
            await aclose(generator, job.request_id)
            raise
        return SSEResponse(self._events(job, first, generator), headers={"Cache-Control": "no-cache"})

    async def _events(
        self, job: Job, first: GenerationChunk | None, generator: AsyncIterator[GenerationChunk]
    ) -> AsyncIterator[str]:
        stream = self._text_stream(job)
        try:
            if job.chat:
                yield sse(self._chunk(job, api.Delta(role="assistant", content=""), None))
            async for chunk in chain(first, generator):
                for event in self._token_events(job, stream, chunk):
                    yield event
                if stream.done:
                    break
            if not stream.done:
                raise GenerationError("generation ended without finishing", ErrorKind.UPSTREAM_FAILED)
            job.outcome.finish(stream.finish_reason, len(job.prompt_ids), stream.completion_tokens)
            http_tracing.record_gen_ai_usage(stream.completion_tokens, stream.finish_reason)
            if job.include_usage:
                yield sse(self._usage_chunk(job, api.Usage.of(len(job.prompt_ids), stream.completion_tokens)))
            log.info(
                "[%s] streamed: %s, %d tokens", job.request_id, stream.finish_reason, stream.completion_tokens
            )
        except GenerationError as exc:
            status, body = generation_error_body(exc)
            log.warning("[%s] failed mid-stream (%d): %s", job.request_id, status, exc.message)
            job.outcome.status = str(status)
            yield sse(body)
        except asyncio.CancelledError:
            log.info("[%s] client disconnected; generation cancelled", job.request_id)
            raise
        finally:
            await aclose(generator, job.request_id)
        yield sse("[DONE]")

    def _token_events(self, job: Job, stream: TextStream, chunk: GenerationChunk) -> Iterator[str]:
        """One event per token, as OpenAI and vLLM send them, so that clients timing each chunk see
        each token: text not yet shown (a split character, a possible stop string) makes an empty
        one. With tools, a token that adds nothing to send makes none (vLLM's rule)."""
        for piece in per_token(chunk):
            text = stream.feed(piece)
            if text or stream.done or (piece.token_ids and not job.tools):
                lps = self._logprobs(job, stream.take_fed_logprobs())
                yield sse(self._chunk(job, text, stream.finish_reason if stream.done else None, lps))
            if stream.done:
                return

    def _chunk(
        self, job: Job, content: str | api.Delta, finish_reason: str | None, lps: dict | None = None
    ) -> dict:
        common = {"id": job.response_id, "created": job.created, "model": self.model_name}
        if job.chat:
            if isinstance(content, api.Delta):
                delta = content
            else:  # a token's chunk says "" while its text waits; the closing chunk's delta is {}
                delta = api.Delta(content=content if content or finish_reason is None else None)
            choice = api.ChatChunkChoice(delta=delta, logprobs=lps, finish_reason=finish_reason)
            chunk = api.ChatCompletionChunk(choices=[choice], **common)
        else:
            content, lps = echo.prepend(job.echo, self.token_texts, content, lps, job.top_logprobs)
            choice = api.CompletionChoice(text=content, logprobs=lps, finish_reason=finish_reason)
            chunk = api.CompletionChunk(choices=[choice], **common)
        return chunk.model_dump(mode="json", exclude=None if job.include_usage else {"usage"})

    def _usage_chunk(self, job: Job, usage: api.Usage) -> dict:
        kind = api.ChatCompletionChunk if job.chat else api.CompletionChunk
        chunk = kind(id=job.response_id, created=job.created, model=self.model_name, choices=[], usage=usage)
        return chunk.model_dump(mode="json")


def create_app(
    backend: GenerationBackend,
    model_name: str,
    tokenizer: Tokenizer,
    max_model_len: int,
    readiness: Callable[[], tuple[bool, str]] | None = None,
    api_keys: tuple[KeyRing, KeyLimits] | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over ``backend``; ``readiness`` answers ``/ready`` (ready, what is
    missing), by default whether the backend can serve; ``api_keys``: the keys required and their
    limits (http_auth.py)."""
    server = OpenAIServer(backend, model_name, tokenizer, max_model_len)
    app = FastAPI(
        title="pdmesh coordinator", docs_url=None, redoc_url=None, telemetry=http_tracing.fastapi_telemetry()
    )
    app.state.server = server
    if api_keys is not None:  # innermost of the three: its log lines have the request id
        app.add_middleware(ApiKeyMiddleware, ring=api_keys[0], limits=api_keys[1])
    app.add_middleware(RequestMetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so the request id is there first
    install_error_handlers(app)
    http_schema.document(app, model_name, tokenizer.vocab_size)

    health_answers = {503: {"model": api.HealthStatus, "description": "Not ready"}}
    completion_answers = http_schema.generation_responses(api.CompletionResponse, api.CompletionChunk)
    chat_answers = http_schema.generation_responses(api.ChatCompletionResponse, api.ChatCompletionChunk)

    @app.get("/health", response_model=api.HealthStatus, responses=health_answers)
    async def health() -> JSONResponse:
        ready = backend.ready()
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

    @app.get("/ready", response_model=api.ReadyStatus, responses={503: {"model": api.ReadyStatus}})
    async def ready() -> JSONResponse:
        ok, missing = readiness() if readiness is not None else (backend.ready(), "")
        body = {"status": "ready"} if ok else {"status": "not ready", "missing": missing or "instances"}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models", response_model=None, responses={200: {"model": api.ModelList}})
    async def models() -> dict:
        return api.ModelList(data=[api.ModelCard(id=model_name, max_model_len=max_model_len)]).model_dump(
            mode="json"
        )

    @app.post("/v1/completions", response_model=None, responses=completion_answers)
    async def completions(body: api.CompletionRequest, request: Request) -> Response:
        server.check_common(body)
        prompts = server.completion_prompts(body)
        jobs = [server.prepare(body, ids, request.state.request_id, chat=False) for ids in prompts]
        echo.attach(body, jobs, server.tokenizer)
        request.state.outcome = jobs[0].outcome
        return await http_fanout.respond(server, body, jobs, request)

    @app.post("/v1/chat/completions", response_model=None, responses=chat_answers)
    async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Response:
        server.check_common(body)
        tools = plan_tools(body, server.tokenizer)
        job = server.prepare(body, server.chat_prompt(body, tools), request.state.request_id, chat=True)
        attach_tools(job, tools)
        echo.attach(body, [job], server.tokenizer)
        request.state.outcome = job.outcome
        return await http_fanout.respond(server, body, [job], request)

    app.include_router(tokenize_router)  # /tokenize, /detokenize (vLLM's)
    app.include_router(native_router)  # /infer (MindIE's), /generate, /generate_stream (TGI's)
    return app
