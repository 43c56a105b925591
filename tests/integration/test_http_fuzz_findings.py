"""Regression tests for what fuzzing the HTTP API from its OpenAPI schema found (tests/e2e/test_fuzz_http.py).

Each test names the defect it pins: before the fix the answer was a 500, a misleading message, an
accepted schema violation, or a schema that did not document the server's real answers.
"""

from __future__ import annotations

import json
import logging

import pytest

from tests.integration.http_harness import MESSAGES, MODEL, assert_error, call

pytestmark = pytest.mark.timeout(60)


def post(app, body, path: str = "/v1/completions", **kwargs):
    return call(app, "POST", path, json=body, **kwargs)


def raw(app, content: bytes, content_type: str = "application/json", path: str = "/v1/completions"):
    return call(app, "POST", path, content=content, headers={"content-type": content_type})


# -- values the workers' protocol cannot carry: were 500s (protobuf "Value out of range") ---------------


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("seed", 2**63, "seed must be <= 9223372036854775807"),
        ("seed", -(2**63) - 1, "seed must be >= -9223372036854775808"),
        ("top_k", 2**31, "top_k must be <= 2147483647"),
        ("top_k", -2, "top_k must be >= -1"),
        ("stop_token_ids", [-1], "stop_token_ids.0 must be >= 0"),
    ],
)
def test_integers_beyond_the_protocol_are_refused(app, backend, field, value, match) -> None:
    error = assert_error(post(app, {"prompt": "hi", field: value}), 400, match)
    assert error["param"].startswith(field)
    assert not backend.calls


def test_stop_token_ids_outside_the_vocabulary_are_refused(app, backend, tok) -> None:
    for ids in ([tok.vocab_size], [2**31], [5, 2**40]):
        error = assert_error(post(app, {"prompt": "hi", "stop_token_ids": ids}), 400, "stop_token_ids")
        assert error["param"] == "stop_token_ids" and str(tok.vocab_size) in error["message"]
    assert not backend.calls
    assert post(app, {"prompt": "hi", "stop_token_ids": [tok.vocab_size - 1]}).status_code == 200


def test_positive_values_that_float32_rounds_to_zero_are_refused_by_name(app, backend) -> None:
    """5e-324 was accepted here, became 0 on the way to the worker and was refused there without a param."""
    for field in ("top_p", "repetition_penalty"):
        error = assert_error(post(app, {"prompt": "hi", field: 5e-324}), 400, f"{field} must be >=")
        assert error["param"] == field
    assert not backend.calls
    assert post(app, {"prompt": "hi", "top_p": 1e-30, "repetition_penalty": 1e-30}).status_code == 200


# -- values of the wrong JSON type: were accepted (pydantic's lax mode) or misleadingly refused ---------


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": [[False]]}, "prompt.0.0"),  # was generated as token id 0
        ({"prompt": [True, 1]}, "prompt.0"),
        ({"prompt": "hi", "max_tokens": True}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "3"}, "max_tokens"),
        ({"prompt": "hi", "temperature": "0.5"}, "temperature"),
        ({"prompt": "hi", "stream": "false"}, "stream"),
        ({"prompt": "hi", "ignore_eos": 1}, "ignore_eos"),
        ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ],
)
def test_values_of_the_wrong_type_are_refused(app, backend, body, param) -> None:
    error = assert_error(post(app, body), 400, param)
    assert error["param"].startswith(param)
    assert not backend.calls


def test_integers_written_as_floats_are_integers(app, backend) -> None:
    """JSON Schema's integers include 2.0: schema-valid requests like this one were refused."""
    body = {"prompt": [5.0, 6], "max_tokens": 2.0, "seed": 7.0, "top_k": 3.0, "stop_token_ids": [9.0]}
    assert post(app, body).status_code == 200
    _, prompt_ids, sampling = backend.calls[0]
    assert prompt_ids == [5, 6] and (sampling.max_tokens, sampling.seed, sampling.top_k) == (2, 7, 3)
    assert sampling.stop_token_ids == [9] and all(type(v) is int for v in (sampling.seed, *prompt_ids))
    assert_error(
        post(app, {"prompt": "hi", "max_tokens": 2.5}), 400, "max_tokens: Input should be a valid integer"
    )


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_are_refused(app, backend, literal) -> None:
    """NaN was refused as "temperature must be >= 0"; Infinity and 1e999 were accepted."""
    body = b'{"prompt": "hi", "temperature": ' + literal + b"}"
    error = assert_error(raw(app, body), 400, "temperature: Input should be a finite number")
    assert error["param"] == "temperature"
    assert not backend.calls


def test_union_errors_name_the_field_and_what_it_may_be(app) -> None:
    """The first union member's complaint ("should be a valid string") was answered for any prompt."""
    error = assert_error(post(app, {"prompt": 5}), 400, "a valid string or a valid list")
    assert error["param"] == "prompt"
    error = assert_error(post(app, {"prompt": [[1, 2, "x"]]}), 400, "prompt.0.2: Input should be")
    assert error["param"] == "prompt.0.2"
    error = assert_error(post(app, {"prompt": [[]]}), 400, "prompt.0 must not be empty")
    content = [{"type": 5}]
    error = assert_error(
        post(app, {"messages": [{"role": "user", "content": content}]}, "/v1/chat/completions"),
        400,
        "messages.0.content.0.type",
    )


def test_a_body_that_is_not_json_is_a_415_naming_the_content_type(app, backend) -> None:
    """A JSON body sent as a form was refused as "the request body must be a JSON object"."""
    body = json.dumps({"prompt": "hi"}).encode()
    assert_error(
        raw(app, body, "application/x-www-form-urlencoded"), 415, "application/x-www-form-urlencoded"
    )
    assert_error(raw(app, body, "text/plain", "/v1/chat/completions"), 415, "Content-Type: application/json")
    assert raw(app, body, "application/json; charset=utf-8").status_code == 200
    assert_error(call(app, "POST", "/v1/chat/completions"), 400, "request body is missing")


def test_a_message_without_content_is_refused_by_name_unless_the_assistants(app, backend) -> None:
    """The template's "'dict object' has no attribute 'content'" was the answer, naming no message."""
    chat = "/v1/chat/completions"
    for role in ("user", "system", "tool"):
        messages = [{"role": "user", "content": "hi"}, {"role": role}]
        error = assert_error(
            post(app, {"messages": messages}, chat), 400, f"content is required in a '{role}'"
        )
        assert error["param"] == "messages.1.content"
    assert not backend.calls
    messages = [*MESSAGES, {"role": "assistant", "content": None}, {"role": "user", "content": "and?"}]
    assert post(app, {"messages": messages}, chat).status_code == 200
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    error = assert_error(
        post(app, {"messages": [{"role": "user", "content": image}]}, chat), 400, "should be 'text'"
    )
    assert error["param"] == "messages.0.content.0.type"


# -- answers the schema did not document -----------------------------------------------------------------


def test_method_not_allowed_says_which_methods_are(app) -> None:
    """The 405 lost Starlette's Allow header (RFC 9110 requires it)."""
    for method, path, allowed in (("PUT", "/v1/models", "GET"), ("GET", "/v1/completions", "POST")):
        response = call(app, method, path)
        assert_error(response, 405, "method not allowed")
        assert response.headers["allow"] == allowed


def test_the_openapi_schema_documents_every_answer(app, tok) -> None:
    """It documented 422 (never answered) and not 400/404/415/5xx, the event stream nor /health's 503."""
    schema = call(app, "GET", "/openapi.json").json()
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        answers = schema["paths"][path]["post"]["responses"]
        assert "422" not in answers
        for status in ("400", "404", "415", "429", "500", "502", "503", "504"):
            assert answers[status]["content"]["application/json"]["schema"] == error_ref
        event = answers["200"]["content"]["text/event-stream"]["schema"]
        assert event["required"] == ["data"]
    assert "503" in schema["paths"]["/health"]["get"]["responses"]
    names = schema["components"]["schemas"]
    assert {"CompletionChunk", "ChatCompletionChunk", "ErrorResponse"} <= set(names)
    assert not {"HTTPValidationError", "ValidationError"} & set(names)
    assert names["CompletionRequest"]["properties"]["logprobs"]["anyOf"][0]["maximum"] == 20
    assert names["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    assert names["CompletionRequest"]["properties"]["model"]["anyOf"][0] == {"const": MODEL}
    stop_ids = names["ChatCompletionRequest"]["properties"]["stop_token_ids"]["anyOf"][0]["items"]
    assert (stop_ids["minimum"], stop_ids["maximum"]) == (0, tok.vocab_size - 1)


# -- swallowed errors are logged -----------------------------------------------------------------------


class _UnclosableStream:
    """One finished chunk, then an ``aclose`` that fails."""

    def __init__(self, chunk) -> None:
        self.chunks = [chunk]

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop()

    async def aclose(self) -> None:
        raise RuntimeError("close failed")


def test_a_stream_that_fails_to_close_is_logged_with_the_request_id(app, backend, caplog) -> None:
    from services.coordinator.backend import GenerationChunk

    backend.generate = lambda *args: _UnclosableStream(GenerationChunk([5], True, "length"))
    with caplog.at_level(logging.WARNING, logger="services.coordinator.http_util"):
        for stream in (False, True):
            body = {"messages": MESSAGES, "max_tokens": 1, "stream": stream}
            headers = {"x-request-id": f"unclosable-{stream}"}
            assert post(app, body, "/v1/chat/completions", headers=headers).status_code == 200
    for stream in (False, True):
        assert f"[unclosable-{stream}] closing a generation stream failed" in caplog.text
    assert "RuntimeError: close failed" in caplog.text
