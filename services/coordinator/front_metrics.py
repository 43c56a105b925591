"""Counts the fronts' generation requests in ``pdmesh_coordinator_requests_total``.

HTTP: an ASGI middleware; it sees the status every answer starts with (errors raised before generation
included) and, at the end, the ``Outcome`` the route left in the request's state (finish reason, usage,
or the status of an error that came after a stream had started). A stream the client left before it
finished counts as 499, as the non-streaming answer to a departed client does.

gRPC: a decorator on ``Generate`` that reads the replies it streams (finish reason, usage) and the
status it ends with (``OK``, or the code it aborted with; ``CANCELLED`` when the client left).
"""

from __future__ import annotations

import asyncio
import functools

import grpc

from pdmesh.observability import coordinator_metrics as metrics

COUNTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/infer", "/generate", "/generate_stream")
CLIENT_GONE = "499"


class RequestMetricsMiddleware:
    """Records one ``requests_total`` sample per generation request once its answer is complete."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") not in COUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        status = {"code": 500}  # what the client gets if the app fails before answering

        async def send_and_watch(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            outcome = scope.get("state", {}).get("outcome")
            code = str(status["code"])
            if code == "200" and outcome is not None and not outcome.finished and outcome.status is None:
                code = CLIENT_GONE
            metrics.record(scope["path"], code, outcome)


GRPC_ENDPOINT = "pdmesh.v1.Coordinator/Generate"


def count_grpc_requests(method):
    """Wraps a server-streaming servicer method so that each call is counted once when it ends."""

    @functools.wraps(method)
    async def counted(self, request, context):
        outcome, status = metrics.Outcome(), "UNKNOWN"
        try:
            async for reply in method(self, request, context):
                if reply.finished:  # once per sample (n > 1: each carries its own completion tokens)
                    usage, generated = reply.usage, outcome.completion_tokens + reply.usage.completion_tokens
                    outcome.finish(reply.finish_reason, usage.prompt_tokens, generated)
                yield reply
            status = "OK"
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except BaseException:
            code = context.code()  # set by context.abort
            status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            raise
        finally:
            metrics.record(GRPC_ENDPOINT, status, outcome)

    return counted
