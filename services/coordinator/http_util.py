"""ASGI plumbing for the HTTP front: request ids, disconnect-aware waiting and streaming."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import MutableHeaders

from services.coordinator.openai_api import new_id

REQUEST_ID_HEADER = "x-request-id"
T = TypeVar("T")


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
        streaming = asyncio.ensure_future(self.stream_response(send))
        watching = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watching):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await task
            await aclose(self.body_iterator)


async def aclose(iterator: Any) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


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
            with contextlib.suppress(asyncio.CancelledError):
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
