"""Structured outputs over HTTP: the request's constraint as one ``StructuredOutput``, checked here.

Where a request may say it (vLLM's reference; ``docs/api.md``):

- ``response_format``: ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}`` or ``{"type": "text"}`` (no constraint);
- vLLM's extras ``guided_json`` (a schema, as an object or JSON text), ``guided_regex``,
  ``guided_choice`` (a list of strings), ``guided_grammar`` (Lark or GBNF);
- vLLM's newer ``structured_outputs`` object with one of ``json``, ``regex``, ``choice``,
  ``grammar``, ``json_object: true``.

One constraint per request: two of these at once are refused, naming both. The constraint is
compiled here (``pdmesh.structured.check``), so a malformed schema, regex or grammar is a 400 naming
the field before any worker sees it; the engine enforces it as a mask on each token's logits.
"""

from __future__ import annotations

import json

from pdmesh import structured as constraints
from pdmesh.generation import StructuredOutput
from services.coordinator.http_errors import ApiError
from services.coordinator.structured_api import ResponseFormat, StructuredOutputsParams

ONE_OF_PARAMS = ("json", "regex", "choice", "grammar", "json_object")


def _schema_text(schema: str | dict) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


def _response_format(rf: ResponseFormat) -> StructuredOutput | None:
    if rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredOutput("json_object", "")
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        field = "response_format.json_schema" + ("" if rf.json_schema is None else ".schema")
        raise ApiError(f"{field} is required when response_format.type is json_schema", param=field)
    return StructuredOutput("json_schema", json.dumps(rf.json_schema.schema_))


def _structured_outputs(so: StructuredOutputsParams) -> StructuredOutput:
    given = {
        "json": None if so.json_ is None else StructuredOutput("json_schema", _schema_text(so.json_)),
        "regex": None if so.regex is None else StructuredOutput("regex", so.regex),
        "choice": None if so.choice is None else StructuredOutput("choice", json.dumps(so.choice)),
        "grammar": None if so.grammar is None else StructuredOutput("grammar", so.grammar),
        "json_object": StructuredOutput("json_object", "") if so.json_object else None,
    }
    set_ = [name for name, value in given.items() if value is not None]
    if len(set_) != 1:
        raise ApiError(
            f"structured_outputs must set exactly one of {', '.join(ONE_OF_PARAMS)} (got {len(set_)})",
            param="structured_outputs",
        )
    return given[set_[0]]


def _candidates(body) -> list[tuple[str, StructuredOutput]]:
    """(the field, its constraint) for each structured-output field the request sets."""
    found: list[tuple[str, StructuredOutput | None]] = []
    if body.response_format is not None:
        found.append(("response_format", _response_format(body.response_format)))
    if body.guided_json is not None:
        found.append(("guided_json", StructuredOutput("json_schema", _schema_text(body.guided_json))))
    if body.guided_regex is not None:
        found.append(("guided_regex", StructuredOutput("regex", body.guided_regex)))
    if body.guided_choice is not None:
        found.append(("guided_choice", StructuredOutput("choice", json.dumps(body.guided_choice))))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", StructuredOutput("grammar", body.guided_grammar)))
    if body.structured_outputs is not None:
        found.append(("structured_outputs", _structured_outputs(body.structured_outputs)))
    return [(name, s) for name, s in found if s is not None]


def from_request(body) -> StructuredOutput | None:
    """The request's constraint, compiled to check it (None: free text); ApiError (400) naming the
    field when it is malformed or when two fields ask for constraints."""
    candidates = _candidates(body)
    if not candidates:
        return None
    if len(candidates) > 1:
        names = " and ".join(name for name, _ in candidates)
        raise ApiError(
            f"only one structured output constraint per request: got {names}", param=candidates[1][0]
        )
    name, structured = candidates[0]
    try:
        constraints.check(structured)
    except ValueError as exc:
        raise ApiError(f"{name}: {exc}", param=name) from None
    return structured
