"""Errors of the HTTP front as OpenAI error objects: refusals, validation failures, backend errors."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.coordinator import openai_api as api
from services.coordinator.backend import OPENAI_ERROR_TYPES, GenerationError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request refused before generation, answered as an OpenAI error object."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


def error_response(
    status: int, message: str, error_type: str | None = None, param=None, code=None
) -> JSONResponse:
    error_type = error_type or OPENAI_ERROR_TYPES.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    return JSONResponse(api.error_body(message, error_type, param, code), status_code=status)


def _field_path(loc) -> str:
    """``messages.0.role`` from a pydantic error location, without "body" and union member tags."""
    parts = []
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, str) and (
            "[" in part or part in ("str", "int", "float", "bool") or part[:1].isupper()
        ):
            break
        parts.append(str(part))
    return ".".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        if first.get("type") == "json_invalid":
            return error_response(
                400, f"invalid JSON body: {first.get('ctx', {}).get('error', '')}".rstrip(": ")
            )
        where = _field_path(first.get("loc", ()))
        if not where:
            return error_response(400, f"the request body must be a JSON object ({first.get('msg', '')})")
        return error_response(400, f"{where}: {first.get('msg', 'invalid value')}", param=where)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        log.info("[%s] refused (%d): %s", request.state.request_id, exc.status, exc.message)
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code)

    @app.exception_handler(GenerationError)
    async def _generation_error(request: Request, exc: GenerationError) -> JSONResponse:
        log.warning("[%s] failed (%d): %s", request.state.request_id, exc.status_code, exc.message)
        response = error_response(exc.status_code, exc.message, exc.error_type, code=exc.code)
        if exc.retry_after_s is not None:
            response.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("[%s] internal error", request.state.request_id)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_server_error")
