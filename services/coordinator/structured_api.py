"""Request shapes of structured outputs: OpenAI's ``response_format`` and vLLM's
``structured_outputs`` object (its ``guided_*`` extras are plain fields of the request models).

Unknown keys inside them are refused by name (``extra="forbid"``), as at the top level. What they
mean and how they are checked: structured_outputs.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's named schema (``strict`` or not, it is enforced)."""

    model_config = _STRICT

    name: str
    description: str | None = None
    # ``schema`` would shadow a BaseModel attribute: the field has another name, the JSON key is ``schema``
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: ``text`` (no constraint), ``json_object`` or ``json_schema``."""

    model_config = _STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(BaseModel):
    """vLLM's ``structured_outputs``: exactly one of ``json``, ``regex``, ``choice``, ``grammar`` or
    ``json_object: true``."""

    model_config = _STRICT

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
