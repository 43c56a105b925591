"""ASGI plumbing for the HTTP front: request ids, disconnect-aware waiting and streaming.

Nothing here swallows an error silently: a client gone mid-stream is logged at debug level (routine),
a generation stream that fails to close at warning level (unexpected); the cancellations this module
asks for itself are awaited and expected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import MutableHeaders

from services.coordinator.openai_api import new_id

REQUEST_ID_HEADER = "x-request-id"
T = TypeVar("T")
log = logging.getLogger(__name__)


def sse(payload: dict | str) -> str:
    """One server-sent event whose ``data`` is ``payload`` (JSON unless already a string)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class ClientGone(Exception):
    """The client disconnected while its request was generating."""


class RequestIdMiddleware:
    """Gives each HTTP request an id (``scope["state"]["request_id"]``) and echoes it in the response."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if 0 < len(given) <= 128 and given.isprintable() else new_id("req")
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Request-Id", request_id)
            await send(message)

        await self.app(scope, receive, send_with_id)


class SSEResponse(StreamingResponse):
    """Server-sent events that stop (and close their iterator) as soon as the client disconnects."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        request_id = scope.get("state", {}).get("request_id", "-")
        streaming = asyncio.ensure_future(self.stream_response(send))
        watching = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
            if watching.done() and not streaming.done():
                log.debug("[%s] client disconnected mid-stream; stopping the stream", request_id)
        finally:
            for task in (streaming, watching):
                task.cancel()
            try:
                for task in (streaming, watching):
                    await _settle(task, request_id)
            finally:
                await aclose(self.body_iterator, request_id)


async def _settle(task: asyncio.Future, request_id: str) -> None:
    """Waits for a task of the stream's to end; its errors but a broken connection propagate."""
    try:
        await task
    except asyncio.CancelledError:
        pass  # SSEResponse cancelled it: the stream has ended one way or the other
    except OSError as exc:  # the client's connection broke while we wrote to it
        log.debug("[%s] client connection lost while streaming: %r", request_id, exc)


async def aclose(iterator: Any, request_id: str = "-") -> None:
    """Closes an async iterator (which cancels its generation); a failure to close is only logged."""
    close = getattr(iterator, "aclose", None)
    if close is None:
        return
    try:
        await close()
    except Exception:
        log.warning("[%s] closing a generation stream failed", request_id, exc_info=True)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Awaits ``awaitable``; cancels it and raises ClientGone if the client disconnects first."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # the cancellation just asked for
                await work
    if work.cancelled():
        raise ClientGone()
    return work.result()


async def chain(first: T | None, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    """``first`` (when there is one), then ``rest``."""
    if first is not None:
        yield first
        async for item in rest:
            yield item
