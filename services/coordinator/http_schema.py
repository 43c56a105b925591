"""The HTTP front's OpenAPI schema (``/openapi.json``): every answer of each route, errors and event
streams included, so that clients and schema-driven tests (``make fuzz``) see what the server does.

- A generation route answers 200 with its completion as JSON, or as server-sent events: each event's
  ``data`` is a JSON stream chunk (or, after a failure mid-stream, an OpenAI error object), the last
  one ``[DONE]`` on the OpenAI routes. Under Open API 3.1 an event-stream entry's ``schema``
  describes one event.
- Fields pdmesh knows but does not implement (request_fields.py) are documented as properties that
  take only ``null``, with the reason.
- ``model`` may only be the model served (or left out); others are answered 404. Token ids must be
  below the vocabulary's size.
- Its errors are OpenAI error objects (``ERROR_RESPONSES``); FastAPI's 422 is dropped: validation
  failures are answered 400 (http_errors.py).
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from services.coordinator import openai_api as api
from services.coordinator import request_fields

_REF = "#/components/schemas/{model}"
_CHUNKS = (api.CompletionChunk, api.ChatCompletionChunk, api.ErrorResponse)
_REQUESTS = (api.CompletionRequest, api.ChatCompletionRequest)

# The answers of the generation routes besides 200.
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": api.ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request: the message and ``param`` name the problem",
        404: "Unknown model",
        415: "The body is not JSON (Content-Type must be application/json)",
        429: "The coordinator is at capacity (see Retry-After)",
        500: "Internal error",
        502: "A worker failed",
        503: "No healthy prefill and decode instances (see Retry-After)",
        504: "A worker timed out",
    }.items()
}


def _event(chunk: type[BaseModel], done: bool) -> dict:
    """One server-sent event of a stream of ``chunk``s (then ``[DONE]`` when ``done``)."""
    payload = {"anyOf": [{"$ref": _REF.format(model=m.__name__)} for m in (chunk, api.ErrorResponse)]}
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    data = {"anyOf": [{"const": "[DONE]"}, json_data]} if done else json_data
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def generation_responses(model: type[BaseModel], chunk: type[BaseModel], done: bool = True) -> dict:
    """The answers of a generation route: ``model`` as JSON, or a stream of ``chunk`` events, or an error."""
    streamed = {"text/event-stream": {"schema": _event(chunk, done)}}
    ok = {"model": model, "description": "The completion (server-sent events when streaming)"}
    return {200: {**ok, "content": streamed}, **ERROR_RESPONSES}


def _bound_token_ids(schema: dict, vocab_size: int) -> None:
    """Token ids (the integers in ``prompt`` and ``stop_token_ids``) are below the vocabulary size."""
    if schema.get("type") == "integer":
        schema["maximum"] = vocab_size - 1
    for sub in (*schema.get("anyOf", ()), *([schema["items"]] if "items" in schema else [])):
        _bound_token_ids(sub, vocab_size)


def _native_modules():
    """The routers' modules, which import this one (for the answers above)."""
    from services.coordinator import native_api, tokenize_api

    return native_api, tokenize_api


def _document_refused(schema: dict, model: type[BaseModel], refused: dict) -> None:
    """Fields pdmesh knows and does not implement: only ``null`` (or what asks nothing) is taken."""
    properties = schema.setdefault("properties", {})
    for name, (accepted, why) in refused.items():
        if name not in model.model_fields and name not in properties:
            values = [{"type": "null"}, *({"const": v} for v in accepted)]
            properties[name] = {"anyOf": values, "description": f"Not supported by pdmesh: {why}"}


def document(app: FastAPI, model_name: str, vocab_size: int) -> None:
    """Completes ``app``'s schema: names the one model served and the vocabulary's size, adds the
    stream chunks' schemas and drops FastAPI's 422 answers."""
    generate = app.openapi
    model = {"anyOf": [{"const": model_name}, {"type": "null"}], "description": "The model served (else 404)"}

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            # Pydantic's own request schemas: FastAPI's OpenAPI model makes floats of integer bounds
            # (2**63 - 1 becoming 2**63).
            native, tokenize = _native_modules()
            every = (*_REQUESTS, *native.REQUESTS, *tokenize.REQUESTS)
            _, requests = models_json_schema([(m, "validation") for m in every], ref_template=_REF)
            schemas.update(requests["$defs"])
            for request in every:
                properties = schemas[request.__name__]["properties"]
                if "model" in properties:
                    properties["model"] = model
                for name in ("prompt", "stop_token_ids", "tokens"):
                    _bound_token_ids(properties.get(name, {}), vocab_size)
            for request in _REQUESTS:
                _document_refused(schemas[request.__name__], request, request_fields.REFUSED)
            parameters = native.NativeParameters
            _document_refused(schemas[parameters.__name__], parameters, native.NATIVE_REFUSED)
            streamed = (*_CHUNKS, native.InferStreamEvent, native.TGIStreamEvent)
            _, chunks = models_json_schema([(m, "serialization") for m in streamed], ref_template=_REF)
            for name, definition in chunks.get("$defs", {}).items():
                schemas.setdefault(name, definition)
        return app.openapi_schema

    app.openapi = openapi
