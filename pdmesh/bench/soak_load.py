"""The load of ``pdmesh bench soak``: random OpenAI requests as a Poisson process, and how each ended.

Half the requests stream; chat and text completions alternate at random; every request uses
``ignore_eos`` so that its length is its ``max_tokens``. ``send`` never raises: a request ends as
``completed``, ``503`` (HTTP status, or a mid-stream error event with that code), ``5xx`` (any other
5xx, either way), ``broken`` (a stream that stopped without an error event or a finish reason) or
``error`` (4xx, time-outs, connection errors).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx

from pdmesh.bench.request import error_message
from pdmesh.bench.soak_monitor import HealthMonitor

log = logging.getLogger(__name__)

WORDS = "rain on a tin roof sings softly while the old river keeps its slow patient way to sea".split()


@dataclass(frozen=True)
class LoadSpec:
    """The load: Poisson arrivals at ``rate`` per second for ``duration_s``, up to ``max_tokens`` each."""

    rate: float
    duration_s: float
    seed: int
    max_tokens: int
    timeout_s: float  # a whole request's limit


@dataclass
class Record:
    """One request: seconds since the run's start, and how it ended."""

    start: float
    end: float
    stream: bool
    outcome: str  # completed | 503 | 5xx | broken | error
    status: int | None = None
    error: str = ""


# ------------------------------------------------------------------------------------------ requests


def make_body(rng: random.Random, model: str, max_tokens: int) -> tuple[str, dict]:
    """A random chat or text completion (half streamed): (endpoint path, body)."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 48)))
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": rng.randint(1, max_tokens),
        "temperature": 0,
        "ignore_eos": True,
        "stream": rng.random() < 0.5,
    }
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.5:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


def _failed(status: int, message: str) -> tuple[str, int, str]:
    kind = "503" if status == 503 else "5xx" if status >= 500 else "error"
    return kind, status, message


async def _plain(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, int | None, str]:
    response = await client.post(url, json=body)
    if response.status_code != 200:
        return _failed(response.status_code, error_message(response.content))
    choices = response.json().get("choices") or [{}]
    if not choices[0].get("finish_reason"):
        return "error", 200, "a 200 answer without a finish reason"
    return "completed", 200, ""


def _stream_event(data: str, finished: bool) -> tuple[str, int | None, str] | bool:
    """An outcome when the event ends the stream, else whether a finish reason was seen so far."""
    if data == "[DONE]":
        return ("completed", 200, "") if finished else ("broken", 200, "[DONE] before a finish reason")
    event = json.loads(data)
    error = event.get("error") if isinstance(event, dict) else None
    if error is not None:
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        if isinstance(code, int) and code >= 500:
            return _failed(code, f"mid-stream: {message}")
        return "broken", code if isinstance(code, int) else None, f"mid-stream: {message}"
    choices = event.get("choices") or []
    return finished or any(c.get("finish_reason") for c in choices)


async def _streamed(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, int | None, str]:
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            return _failed(response.status_code, error_message(await response.aread()))
        finished = False
        try:
            async for line in response.aiter_lines():
                if line.startswith("data:") and line[5:].strip():
                    result = _stream_event(line[5:].strip(), finished)
                    if isinstance(result, tuple):
                        return result
                    finished = result
        except httpx.HTTPError as exc:
            return "broken", 200, f"the stream broke: {type(exc).__name__}: {exc}"
    return "broken", 200, "the stream ended before [DONE]"


async def send(client: httpx.AsyncClient, url: str, body: dict, timeout_s: float, t0: float) -> Record:
    """Sends one request and records how it ended; never raises for a failed request."""
    start = time.monotonic() - t0
    try:
        async with asyncio.timeout(timeout_s):
            sender = _streamed if body["stream"] else _plain
            outcome, status, error = await sender(client, url, body)
    except TimeoutError:
        outcome, status, error = "error", None, f"timed out after {timeout_s:g} s"
    except (httpx.HTTPError, ValueError) as exc:
        outcome, status, error = "error", None, f"{type(exc).__name__}: {exc}"
    if outcome != "completed":
        log.info("request at %.1fs: %s %s %s", start, outcome, status, error)
    return Record(start, time.monotonic() - t0, body["stream"], outcome, status, error)


async def load(
    client: httpx.AsyncClient, base_url: str, model: str, spec: LoadSpec, t0: float
) -> list[Record]:
    """Sends the load (``t0``: its start, time.monotonic()); waits for every request to end."""
    rng = random.Random(spec.seed)
    tasks, due = [], 0.0
    while True:
        due += rng.expovariate(spec.rate)
        if due >= spec.duration_s:
            break
        await asyncio.sleep(max(0.0, t0 + due - time.monotonic()))
        path, body = make_body(rng, model, spec.max_tokens)
        tasks.append(asyncio.create_task(send(client, base_url + path, body, spec.timeout_s, t0)))
    return list(await asyncio.gather(*tasks))


def summarize(records: list[Record], health: HealthMonitor, slack_s: float) -> dict[str, Any]:
    """Request counts by outcome, 503s and broken streams split by whether a gap justifies them."""
    counts = Counter({k: 0 for k in ("completed", "503", "5xx", "broken", "error")})
    justified = Counter()
    errors = Counter()
    for r in records:
        counts[r.outcome] += 1
        if r.outcome in ("503", "broken") and health.justifies(r.start, r.end, slack_s):
            justified[r.outcome] += 1
        if r.outcome != "completed":
            errors[f"{r.outcome} {r.status}: {r.error[:160]}"] += 1
    return {
        "sent": len(records),
        "streamed": sum(r.stream for r in records),
        "completed": counts["completed"],
        "unavailable_justified": justified["503"],
        "unavailable_unjustified": counts["503"] - justified["503"],
        "other_5xx": counts["5xx"],
        "broken_streams_justified": justified["broken"],
        "broken_streams_unjustified": counts["broken"] - justified["broken"],
        "other_errors": counts["error"],
        "errors": dict(errors.most_common(10)),
    }
