"""One streaming request to an OpenAI-compatible server, and what it measured.

``send_request`` posts a ``stream: true`` body and reads the server-sent events: the first event of a
generated token sets TTFT, each later one adds an inter-token gap (servers such as vLLM and pdmesh
send one event per token, with empty text while a multi-byte character or a possible stop string
waits, so empty events count; a chat's role-only event and a closing event with only a finish
reason do not), the final ``usage`` event gives the token counts (else the tokenizer, else the
number of token events). It never raises for a failed
request: an HTTP error status, an ``{"error": ...}`` event, a stream that ends before ``[DONE]`` (or a
finish reason), a timeout or a broken connection become a failed ``RequestOutput`` with its
status (None when there is no HTTP status) and message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import httpx
from tokenizers import Tokenizer

from pdmesh.bench.datasets import SampleRequest
from pdmesh.bench.metrics import RequestOutput

log = logging.getLogger(__name__)


@dataclass
class RequestContext:
    """What every request of a run shares."""

    url: str
    headers: dict[str, str]
    chat: bool
    tokenizer: Tokenizer | None
    timeout_s: float | None
    run_start: float = 0.0


def error_message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI error body, else the body's text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500] or "(empty body)"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return text[:500]


def _content(event: dict, chat: bool) -> str:
    """The generated text an event carries ('' for role, usage and finish-only events)."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""


def _role_only(choice: dict, chat: bool) -> bool:
    """A chat's opening event: the role, no token."""
    delta = choice.get("delta") or {}
    return chat and "role" in delta and not delta.get("tool_calls")


class _Stream:
    """Timing and content of one streamed response, fed one SSE event at a time."""

    def __init__(self, ctx: RequestContext, start: float) -> None:
        self.ctx, self.start = ctx, start
        self.last = start
        self.ttft: float | None = None
        self.itl: list[float] = []
        self.parts: list[str] = []
        self.usage: dict | None = None
        self.finished = False
        self.done = False

    def feed(self, event: dict, now: float) -> None:
        if isinstance(event.get("error"), dict | str):
            error = event["error"]
            message = error.get("message", str(error)) if isinstance(error, dict) else error
            code = error.get("code") if isinstance(error, dict) else None
            raise _RequestFailed(code if isinstance(code, int) else None, f"error event: {message}")
        if event.get("usage"):
            self.usage = event["usage"]
        choices = event.get("choices") or []
        if not choices:
            return
        text = _content(event, self.ctx.chat)
        if choices[0].get("finish_reason"):
            self.finished = True
            if not text:  # OpenAI closes with an empty delta; pdmesh's last token may render as ""
                return
        elif not text and _role_only(choices[0], self.ctx.chat):
            return
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.itl.append(now - self.last)
        self.last = now
        self.parts.append(text)

    def output(self, sample: SampleRequest, end: float) -> RequestOutput:
        if not (self.done or self.finished):
            raise _RequestFailed(None, "the stream ended before [DONE]")
        text = "".join(self.parts)
        usage = self.usage or {}
        if usage.get("completion_tokens") is not None:
            tokens = int(usage["completion_tokens"])
        elif self.ctx.tokenizer is not None:
            tokens = len(self.ctx.tokenizer.encode(text, add_special_tokens=False).ids)
        else:
            tokens = len(self.parts)
        latency = end - self.start
        return RequestOutput(
            success=True,
            prompt_len=int(usage.get("prompt_tokens") or sample.prompt_len),
            output_tokens=tokens,
            ttft=latency if self.ttft is None else self.ttft,
            itl=self.itl,
            latency=latency,
            start_time=self.start - self.ctx.run_start,
            generated_text=text,
        )


class _RequestFailed(Exception):
    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _event(line: str) -> dict | str | None:
    """An SSE line's JSON payload, ``"[DONE]"``, or None for comments, other fields and blanks."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data:
        return None
    if data == "[DONE]":
        return data
    try:
        event = json.loads(data)
    except ValueError:
        raise _RequestFailed(None, f"malformed event: {data[:200]}") from None
    return event if isinstance(event, dict) else None


async def _stream(
    client: httpx.AsyncClient, ctx: RequestContext, body: dict, sample: SampleRequest
) -> RequestOutput:
    start = time.perf_counter()
    state = _Stream(ctx, start)
    async with client.stream("POST", ctx.url, json=body, headers=ctx.headers) as response:
        if response.status_code != 200:
            raise _RequestFailed(response.status_code, error_message(await response.aread()))
        async for line in response.aiter_lines():
            event = _event(line)
            if event == "[DONE]":
                state.done = True
                break
            if isinstance(event, dict):
                state.feed(event, time.perf_counter())
    return state.output(sample, time.perf_counter())


async def send_request(
    client: httpx.AsyncClient, ctx: RequestContext, body: dict, sample: SampleRequest
) -> RequestOutput:
    """Sends one streaming request and measures it; never raises for a failed request."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(ctx.timeout_s):
            return await _stream(client, ctx, body, sample)
    except _RequestFailed as exc:
        status, message = exc.status, exc.message
    except TimeoutError:
        status, message = None, f"timed out after {ctx.timeout_s:g} s" if ctx.timeout_s else "timed out"
    except httpx.HTTPError as exc:
        status, message = None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except Exception as exc:  # a malformed response fails its request, never the run
        status, message = None, f"{type(exc).__name__}: {exc}"
    log.debug("request failed (%s): %s", status, message)
    return RequestOutput(
        success=False,
        prompt_len=sample.prompt_len,
        latency=time.perf_counter() - started,
        start_time=started - ctx.run_start,
        status=status,
        error=message,
    )
