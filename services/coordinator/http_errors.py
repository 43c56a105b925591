"""Errors of the HTTP front as OpenAI error objects: refusals, validation failures, backend errors.

A body that fails validation is answered 400 naming the deepest field at fault (``prompt.0.1`` for a
non-integer token id inside a list of lists, not the whole union), or 415 when it did not come as
JSON at all. Fields no model declares come first: ``Unrecognized request argument supplied: NAME``,
and a field pdmesh knows but does not implement is refused with its reason (request_fields.py). Starlette's own errors (404 unknown path, 405 with its ``Allow`` header) keep their
status and headers. A backend's error (``GenerationError``) carries a kind, answered with its HTTP
status here (``HTTP_STATUS``). http_schema.py documents these answers in the OpenAPI schema.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdmesh.errors import ErrorKind
from services.coordinator import openai_api as api
from services.coordinator import request_fields
from services.coordinator.backend import GenerationError
from services.coordinator.validation import bound_message

log = logging.getLogger(__name__)

HTTP_STATUS = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.KV_UNAVAILABLE: 503,
    ErrorKind.DEADLINE_EXCEEDED: 504,
    ErrorKind.UPSTREAM_FAILED: 502,
    ErrorKind.ABORTED: 500,
    ErrorKind.INTERNAL: 500,
}

OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """A request refused before generation, answered as an OpenAI error object."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    return OPENAI_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def generation_error_body(exc: GenerationError) -> tuple[int, dict]:
    """A backend's error as its HTTP status and OpenAI error object (``code``: the status)."""
    status = HTTP_STATUS[exc.kind]
    return status, api.error_body(exc.message, error_type(status), None, status)


def error_response(
    status: int, message: str, openai_type: str | None = None, param=None, code=None
) -> JSONResponse:
    body = api.error_body(message, openai_type or error_type(status), param, code)
    return JSONResponse(body, status_code=status)


def _is_union_tag(part) -> bool:
    """Pydantic names the member of a union it tried: ``str``, ``list[int]``, ``constrained-str``..."""
    return isinstance(part, str) and (
        "[" in part
        or part in ("str", "int", "float", "bool")
        or part.startswith("constrained-")
        or part[:1].isupper()
    )


def _field_path(loc) -> str:
    """``messages.0.role`` from a pydantic error location, without "body" and union member tags."""
    return ".".join(str(part) for part in loc if part != "body" and not _is_union_tag(part))


def _most_specific(errors: list[dict]) -> dict:
    """The error that got deepest into the body: for a union, the member that matched best (a value
    of the right type but out of bounds before a value of the wrong type)."""
    return max(
        errors,
        key=lambda e: (len(e.get("loc", ())), not str(e.get("type", "")).endswith("_type")),
        default={},
    )


_BOUNDS = {
    "greater_than_equal": ("ge", ">="),
    "greater_than": ("gt", ">"),
    "less_than_equal": ("le", "<="),
    "less_than": ("lt", "<"),
}


def _describe(error: dict, where: str) -> str:
    """``temperature must be >= 0`` (as the gRPC front words it too), else pydantic's message."""
    kind, ctx = error.get("type"), error.get("ctx") or {}
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return bound_message(where, op, ctx.get(key))
    if kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        return f"{where} must not be empty"
    return f"{where}: {error.get('msg', 'invalid value')}"


def _either(errors: list[dict], where: str) -> str:
    """A value no member of a union took: "Input should be a valid string or a valid list"."""
    wanted = []
    for e in errors:
        if _field_path(e.get("loc", ())) == where and e.get("type", "").endswith("_type"):
            text = str(e.get("msg", "")).removeprefix("Input should be ")
            if text not in wanted:
                wanted.append(text)
    return "Input should be " + " or ".join(wanted)


def _field_refusal(errors: list[dict]) -> JSONResponse | None:
    """The answer to fields pdmesh does not take (request_fields.py), before any other problem."""
    for error in errors:
        if error.get("type") == request_fields.UNSUPPORTED:
            field = error.get("ctx", {}).get("field")
            where = ".".join(p for p in (_field_path(error.get("loc", ())), field) if p)
            return error_response(400, str(error.get("msg")).replace(field, where, 1), param=where)
    # An object that is of another kind altogether (an image part where text parts go) is named as such.
    wrong = {tuple(e.get("loc", ()))[:-1] for e in errors if e.get("type") != "extra_forbidden"}
    extras = [e for e in errors if e.get("type") == "extra_forbidden"]
    unknown = [_field_path(e.get("loc", ())) for e in extras if tuple(e.get("loc", ()))[:-1] not in wrong]
    if unknown:
        return error_response(400, request_fields.unrecognized_message(unknown), param=unknown[0])
    return None


def _json_content_type(request: Request) -> bool:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    return content_type == "application/json" or content_type.endswith("+json")


def install_error_handlers(app: FastAPI) -> None:
    """Answers every error as an OpenAI error object."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = errors[0] if errors else {}
        log.info("[%s] invalid body: %s", request.state.request_id, first.get("msg", "?"))
        if first.get("type") == "json_invalid":
            return error_response(
                400, f"invalid JSON body: {first.get('ctx', {}).get('error', '')}".rstrip(": ")
            )
        if not _json_content_type(request):
            # FastAPI reads a body of another type as bytes, which then "is not an object".
            given = request.headers.get("content-type", "")
            return error_response(415, f"the body must be JSON (Content-Type: application/json), not {given}")
        refusal = _field_refusal(errors)
        if refusal is not None:
            return refusal
        error = _most_specific(errors)
        where = _field_path(error.get("loc", ()))
        if error.get("type", "").endswith("_type"):
            error = {**error, "msg": _either(errors, where)}
        if not where and error.get("type") == "missing":
            return error_response(400, "the request body is missing: send a JSON object")
        if not where:
            return error_response(400, f"the request body must be a JSON object ({error.get('msg', '')})")
        return error_response(400, _describe(error, where), param=where)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        log.info("[%s] refused (%d): %s", request.state.request_id, exc.status, exc.message)
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code)

    @app.exception_handler(GenerationError)
    async def _generation_error(request: Request, exc: GenerationError) -> JSONResponse:
        status = HTTP_STATUS[exc.kind]
        log.warning("[%s] failed (%d): %s", request.state.request_id, status, exc.message)
        response = error_response(status, exc.message)
        if exc.retry_after_s is not None:
            response.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = error_response(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # a 405's Allow (RFC 9110)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("[%s] internal error", request.state.request_id)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_server_error")
