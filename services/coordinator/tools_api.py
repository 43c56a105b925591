"""OpenAI's tool-calling shapes for chat completions: the request's ``tools`` and ``tool_choice``,
the ``tool_calls`` of assistant messages (in the history and in answers) and their stream deltas.

Request models are read strictly, as the rest of the API's (openai_api.py). Stream deltas drop
their null fields, as vLLM sends them: the first delta of a call carries ``index``, ``id``,
``type`` and ``function.name`` (with the arguments known so far), later ones ``index`` and
``function.arguments`` pieces.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

# As openai_api.STRICT (not imported: openai_api imports this module).
_STRICT = ConfigDict(strict=True, allow_inf_nan=False)

# OpenAI's rule for function names.
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDefinition(BaseModel):
    """A function the model may call; ``parameters`` is a JSON schema of its arguments object."""

    model_config = _STRICT

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the arguments always follow ``parameters`` when a call is forced


class ToolDefinition(BaseModel):
    model_config = _STRICT

    type: Literal["function"]
    function: FunctionDefinition


class FunctionRef(BaseModel):
    model_config = _STRICT

    name: str


class NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": ...}}``: that function must be called."""

    model_config = _STRICT

    type: Literal["function"]
    function: FunctionRef


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    """A call's function: its name and its arguments as a JSON text."""

    model_config = _STRICT

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One call in an assistant message (the request's history, or an answer)."""

    model_config = _STRICT

    id: str = Field(default_factory=lambda: new_call_id())
    type: Literal["function"] = "function"
    function: FunctionCall


def new_call_id() -> str:
    """A tool call's id, as vLLM names them."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _without_nulls(model: BaseModel, handler) -> dict:
    return {k: v for k, v in handler(model).items() if v is not None}


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler) -> dict:
        return _without_nulls(self, handler)


class DeltaToolCall(BaseModel):
    """A piece of a streamed call; pieces of one call share its ``index``."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _serialize(self, handler) -> dict:
        return _without_nulls(self, handler)
