"""The HTTP front's test harness: an echoing backend standing in for the worker mesh, and helpers.

``EchoBackend`` generates the prompt's own ids back (then an end-of-sequence id), honouring max_tokens,
stop_token_ids and ignore_eos, and records what it was asked and whether its iterator was closed. The
real mesh is covered by the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import uvicorn

from pdmesh.generation import SamplingParams
from services.coordinator.backend import GenerationChunk, GenerationError

MODEL = "tiny-chatml"
MAX_MODEL_LEN = 128
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi 你好 🎉"}]


class EchoBackend:
    """Generates the prompt ids back, ``chunk_size`` at a time, then the EOS id."""

    def __init__(self, eos_id: int, chunk_size: int = 1, delay_s: float = 0.0) -> None:
        self.eos_id = eos_id
        self.chunk_size = chunk_size
        self.delay_s = delay_s
        self.is_ready = True
        self.fail_before: GenerationError | None = None
        self.fail_after: tuple[int, GenerationError] | None = None  # (tokens, error)
        self.output_ids: list[int] | None = None  # generate these instead of the prompt
        self.stall_after: int | None = None  # after this many tokens, wait (almost) forever
        self.calls: list[tuple[str, list[int], SamplingParams]] = []
        self.sent: dict[str, int] = {}
        self.closed: set[str] = set()

    def ready(self) -> bool:
        return self.is_ready

    def _planned(self, prompt_ids: list[int], sampling: SamplingParams) -> Iterator[tuple[int, bool]]:
        """(token, is the end-of-sequence); with ignore_eos the prompt repeats until max_tokens."""
        source = self.output_ids if self.output_ids is not None else prompt_ids
        while True:
            yield from ((t, False) for t in source)
            if not sampling.ignore_eos:
                yield self.eos_id, True
                return

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, affinity=None
    ) -> AsyncIterator[GenerationChunk]:
        self.calls.append((request_id, list(prompt_ids), sampling))
        self.sent[request_id] = 0
        try:
            if self.fail_before is not None:
                raise self.fail_before
            batch: list[int] = []
            for token, eos in self._planned(prompt_ids, sampling):
                await asyncio.sleep(self.delay_s)
                if self.stall_after is not None and self.sent[request_id] >= self.stall_after:
                    await asyncio.sleep(3600)
                if self.fail_after is not None and self.sent[request_id] >= self.fail_after[0]:
                    raise self.fail_after[1]
                batch.append(token)
                self.sent[request_id] += 1
                stop = eos or token in sampling.stop_token_ids
                length = self.sent[request_id] >= sampling.max_tokens
                if stop or length:
                    yield GenerationChunk(batch, True, "stop" if stop else "length")
                    return
                if len(batch) >= self.chunk_size:
                    yield GenerationChunk(batch)
                    batch = []
        finally:
            self.closed.add(request_id)


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def sse_events(response: httpx.Response) -> list:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: ")
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(response: httpx.Response, status: int, match: str = "", code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert match.lower() in error["message"].lower()
    if code is not None:
        assert error["code"] == code
    return error


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """``app`` under uvicorn on a free loopback port, in a thread; yields the base URL, then stops it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert server.started, "the test server did not start in 10 s"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
