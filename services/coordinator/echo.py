"""``echo`` and prompt logprobs on the HTTP front, in vLLM's shapes.

- ``/v1/completions`` ``echo: true``: the prompt's text comes before the completion's (a text prompt as
  sent, a token-id prompt decoded), in the first stream chunk when streaming. With ``logprobs`` N the
  prompt's tokens come first in ``logprobs`` (``text_offset`` counts from the prompt's start), the
  first with ``null`` logprob and top list; each other prompt token's top list holds the token itself
  and the N most likely there. ``max_tokens: 0`` with echo returns the prompt alone (what evaluation
  harnesses send to score a prompt): the engine samples one token, which is dropped;
  ``finish_reason`` "length", ``usage.completion_tokens`` 0 (vLLM counts the dropped token).
- ``prompt_logprobs`` N (vLLM's extra, both endpoints, 0..20; set implicitly by echo with logprobs):
  ``choices[i].prompt_logprobs`` (completions) or the response's ``prompt_logprobs`` (chat): ``null``
  for the first prompt token, then ``{"<id>": {"logprob", "rank", "decoded_token"}}`` holding the
  prompt token (its rank: 1 is the most likely) and the N most likely tokens. Not with ``stream``
  (400, as vLLM).

The logprobs are computed on the worker that prefills the prompt (the prefill worker in PD), in
float32, and arrive with the first token (``GenerationChunk.prompt_logprobs``).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdmesh.generation import PromptLogprob
from pdmesh.tokenizer import IncrementalDetokenizer, Tokenizer
from services.coordinator import openai_api as api
from services.coordinator.backend import GenerationChunk
from services.coordinator.http_errors import ApiError
from services.coordinator.http_util import aclose
from services.coordinator.logprobs import FLOOR, TokenTexts

if TYPE_CHECKING:
    from services.coordinator.http_job import Job


@dataclass
class PromptEcho:
    """What one sequence answers about its prompt: its text (echo), its logprobs, or both."""

    ids: list[int]
    text: str | None  # echo: the prompt's text, before the completion's; None: no echo
    offsets: list[int]  # echo: where each prompt token's text starts in ``text``
    only_prompt: bool  # echo with max_tokens 0: the generated token is dropped
    top: int | None  # prompt_logprobs asked of the engine (None: none)
    logprobs: list[PromptLogprob | None] | None = None  # as they came with the first token
    echoed: bool = False  # the prompt went out (in the first stream chunk)


def _offsets(tokenizer: Tokenizer, ids: list[int], skip_special: bool) -> list[int]:
    detok, offsets, at = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special), [], 0
    for token in ids:
        offsets.append(at)
        at += len(detok.add([token]))
    return offsets


def _plan(body: api.SamplingRequest, job: Job, prompt, tokenizer: Tokenizer) -> PromptEcho | None:
    echo = bool(getattr(body, "echo", False))
    top = job.sampling.prompt_logprobs
    if not echo and top is None:
        return None
    text, offsets = None, []
    if echo:
        as_text = isinstance(prompt, str)
        text = prompt if as_text else tokenizer.decode(job.prompt_ids, skip_special_tokens=False)
        offsets = [min(o, len(text)) for o in _offsets(tokenizer, job.prompt_ids, skip_special=as_text)]
    only_prompt = echo and body.max_tokens == 0
    return PromptEcho(list(job.prompt_ids), text, offsets, only_prompt, top)


def attach(body: api.SamplingRequest, jobs: list[Job], tokenizer: Tokenizer) -> None:
    """Sets each prepared job's ``echo`` (one job per prompt, in the request's order); 400 for
    ``prompt_logprobs`` with ``stream``."""
    if body.prompt_logprobs is not None and body.stream:
        raise ApiError("prompt_logprobs are not available when stream is true", param="prompt_logprobs")
    prompts = getattr(body, "prompt", None)
    if isinstance(prompts, str) or not prompts or not isinstance(prompts[0], str | list):
        prompts = [prompts]
    for job, prompt in zip(jobs, prompts, strict=True):
        job.echo = _plan(body, job, prompt, tokenizer)


def watch(job: Job, generator: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    """``generator`` as the job's text stream should see it: the prompt logprobs kept aside; echo with
    max_tokens 0 ends with no token. The job gets its own ``echo`` (samples of one prompt share it)."""
    if job.echo is None:
        return generator
    job.echo = copy.copy(job.echo)
    return _watched(job.echo, generator, job.request_id)


async def _watched(echo: PromptEcho, generator, request_id: str) -> AsyncIterator[GenerationChunk]:
    try:
        async for chunk in generator:
            if chunk.prompt_logprobs is not None:
                echo.logprobs = chunk.prompt_logprobs
            if not echo.only_prompt:
                yield chunk
            elif chunk.finished:
                reason = "length" if chunk.finish_reason in ("stop", "length") else chunk.finish_reason
                yield GenerationChunk([], True, reason, None)
                return
    finally:
        await aclose(generator, request_id)


def prepend(echo: PromptEcho | None, texts: TokenTexts, text: str, lps: dict | None, top: int | None):
    """A completion's (or stream chunk's) text and ``logprobs`` with the echoed prompt: before the
    first that goes out; every chunk's ``text_offset`` counts from the prompt's start."""
    if echo is None or echo.text is None:
        return text, lps
    if lps is not None:
        lps["text_offset"] = [o + len(echo.text) for o in lps["text_offset"]]
    if echo.echoed:
        return text, lps
    echo.echoed = True
    if lps is not None and top is not None:
        ours = _completion_entries(echo, texts, top)
        lps = {
            key: ours[key] + lps[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        }
    return echo.text + text, lps


def completion_choice(job: Job, texts: TokenTexts, text: str, lps: dict | None, reason: str | None):
    """A whole completion's choice, with the echoed prompt and vLLM's ``prompt_logprobs``."""
    text, lps = prepend(job.echo, texts, text, lps, job.top_logprobs)
    prompt_lps = prompt_field(job.echo, texts)
    return api.CompletionChoice(text=text, logprobs=lps, finish_reason=reason, prompt_logprobs=prompt_lps)


def with_prompt_logprobs(job: Job, texts: TokenTexts, response: api.ChatCompletionResponse):
    """A whole chat completion with vLLM's ``prompt_logprobs``."""
    response.prompt_logprobs = prompt_field(job.echo, texts)
    return response


def _completion_entries(echo: PromptEcho, texts: TokenTexts, top: int) -> dict[str, list]:
    entries = echo.logprobs or [None] * len(echo.ids)
    token_logprobs, top_logprobs = [], []
    for token, entry in zip(echo.ids, entries, strict=True):
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        chosen, _, alternatives = entry
        listed = {texts.get(token)[0]: max(chosen, FLOOR)}
        for t, v in list(alternatives.items())[:top]:  # the token and N more: top + 1 at most
            listed.setdefault(texts.get(t)[0], max(v, FLOOR))
        token_logprobs.append(max(chosen, FLOOR))
        top_logprobs.append(listed)
    tokens = [texts.get(t)[0] for t in echo.ids]
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": echo.offsets,
    }


def prompt_field(echo: PromptEcho | None, texts: TokenTexts) -> list[dict | None] | None:
    """vLLM's ``prompt_logprobs``: None when not asked."""
    if echo is None or echo.top is None or echo.logprobs is None:
        return None
    field: list[dict | None] = [None]
    for token, entry in zip(echo.ids[1:], echo.logprobs[1:], strict=True):
        chosen, rank, alternatives = entry
        listed = {str(token): _logprob(texts, token, chosen, rank)}
        for r, (t, v) in enumerate(alternatives.items(), start=1):
            listed.setdefault(str(t), _logprob(texts, t, v, r))
        field.append(listed)
    return field


def _logprob(texts: TokenTexts, token: int, logprob: float, rank: int) -> dict:
    return {"logprob": max(logprob, FLOOR), "rank": rank, "decoded_token": texts.get(token)[0]}
