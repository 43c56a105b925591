"""Tool calling on ``/v1/chat/completions``: ``tools``, ``tool_choice`` and ``parallel_tool_calls``.

``plan_tools`` checks a request's tools against the model and says what to do:

- The tools reach the model through its own chat template (as the ``tools`` variable, each tool
  the request's ``{"type": "function", "function": {...}}`` object), for every ``tool_choice``
  including ``none``, as vLLM renders them. pdmesh knows one tool-call format: Hermes-style
  ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks, which Qwen2.5/Qwen3 templates
  (and pdmesh's random Qwen checkpoints) write; a model whose template writes no such blocks gets
  a 400 for ``tools`` (its calls could not be parsed).
- ``auto`` (the default with tools): the output's ``<tool_call>`` blocks become ``tool_calls``
  (tool_parser.HermesParser). ``none``: plain text, nothing parsed.
- ``required`` and a named function are enforced by a JSON-schema constraint on the output
  (structured outputs, as vLLM does it): ``required`` generates ``[{"name": ..., "parameters":
  {...}}, ...]`` with each name one of the tools' and its parameters valid against that tool's
  ``parameters`` schema; a named function generates its arguments object. So the answer IS a call,
  whatever the model. ``parallel_tool_calls: false`` allows one call (``maxItems`` 1 for
  ``required``; with ``auto``, calls after the first are dropped).
- A message with calls finishes with ``finish_reason: "tool_calls"`` (when the model stopped; a
  call cut by ``max_tokens`` stays ``length``, and forced output cut short is answered as content).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pdmesh import structured as constraints
from pdmesh.generation import SamplingParams, StructuredOutput
from pdmesh.tokenizer import Tokenizer
from services.coordinator import openai_api as api
from services.coordinator.http_errors import ApiError
from services.coordinator.text_stream import TextStream
from services.coordinator.tool_parser import OPEN, HermesParser, NamedParser, RequiredParser
from services.coordinator.tools_api import NamedToolChoice

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolPlan:
    """What a request's tools ask of the prompt, the sampling and the answer."""

    choice: str  # auto, none, required, or named
    tools: list[dict]  # as the chat template gets them
    name: str | None = None  # the named function
    single: bool = False  # parallel_tool_calls: false
    schema: dict | None = field(default=None, repr=False)  # the constraint of required/named

    def template_vars(self) -> dict:
        return {"tools": self.tools}

    def constrain(self, sampling: SamplingParams) -> None:
        """Adds the constraint that forces a call (required, named) to ``sampling``."""
        if self.schema is None:
            return
        if sampling.structured is not None:
            raise ApiError(
                f"tool_choice {self.choice!r} cannot be combined with another structured output "
                "(response_format or a guided_* field): the call's schema already constrains the output",
                param="tool_choice",
            )
        sampling.structured = StructuredOutput(kind="json_schema", spec=json.dumps(self.schema))

    def stream(self, inner: TextStream, streaming: bool) -> TextStream | ToolTextStream:
        """``inner`` with the output's calls parsed out (``none``: ``inner`` itself)."""
        if self.choice == "none":
            return inner
        if self.choice == "auto":
            parser: Any = HermesParser()
        elif self.choice == "required":
            parser = RequiredParser()
        else:
            parser = NamedParser(self.name or "")
        return ToolTextStream(inner, parser, streaming, self.single)


def _choice(body: api.ChatCompletionRequest) -> tuple[str, str | None]:
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        return "named", choice.function.name
    return choice or "auto", None


def plan_tools(body: api.ChatCompletionRequest, tokenizer: Tokenizer) -> ToolPlan | None:
    """The request's tool plan (None without tools); ApiError (400) when its tools cannot be served."""
    choice, name = _choice(body)
    if not body.tools:
        if body.tool_choice not in (None, "none"):
            raise ApiError(f"tool_choice {choice!r} needs tools", param="tool_choice")
        return None
    if OPEN not in (tokenizer.chat_template or ""):
        raise ApiError(
            "tools are not supported for this model: its chat template writes no tool-call format pdmesh "
            "knows (pdmesh parses Hermes-style <tool_call> blocks, as Qwen2.5 and Qwen3 templates write them)",
            param="tools",
        )
    functions = [tool.function for tool in body.tools]
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise ApiError("tools: function names must be unique", param="tools")
    if choice == "named" and name not in names:
        raise ApiError(f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
    plan = ToolPlan(
        choice,
        [tool.model_dump(exclude_none=True) for tool in body.tools],
        name,
        single=body.parallel_tool_calls is False,
    )
    if choice == "named":
        plan.schema = next(f.parameters for f in functions if f.name == name) or ANY_OBJECT
    elif choice == "required":
        calls = [_call_schema(f.name, f.parameters or ANY_OBJECT) for f in functions]
        plan.schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if plan.single:
            plan.schema["maxItems"] = 1
    if plan.schema is not None:
        try:
            constraints.check(StructuredOutput(kind="json_schema", spec=json.dumps(plan.schema)))
        except ValueError as exc:
            raise ApiError(
                f"tools: a function's parameters are not a usable JSON schema: {exc}", param="tools"
            ) from None
    return plan


def attach_tools(job: Any, plan: ToolPlan | None) -> None:
    """Gives ``job`` (http_app.Job) its plan: the constraint of a forced call, and the parsing of
    calls out of its output (none for ``tool_choice: none``)."""
    if plan is None or plan.choice == "none":
        return
    plan.constrain(job.sampling)
    job.tools = plan


def _call_schema(name: str, parameters: dict) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [name]}, "parameters": parameters},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


class ToolTextStream:
    """A ``TextStream`` whose text is parsed for tool calls.

    Streaming, ``feed`` answers the delta to send (content and/or call pieces; "" when there is
    nothing yet); otherwise it answers the raw text, and ``message`` the answer's message once done.
    Everything else (usage, logprobs, ``done``) is the inner stream's.
    """

    def __init__(self, inner: TextStream, parser: Any, streaming: bool, single: bool) -> None:
        self.inner, self.parser = inner, parser
        self.streaming, self.single = streaming, single
        self.text = ""
        self.called = False
        self.content: str | None = None
        self.calls: list = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def finish_reason(self) -> str | None:
        reason = self.inner.finish_reason
        return "tool_calls" if reason == "stop" and self.called else reason

    def feed(self, chunk: Any) -> str | api.Delta:
        text = self.inner.feed(chunk)
        if not self.streaming:
            self.text += text
            if self.inner.done:
                self.content, calls = self.parser.parse(self.text)
                self.calls = calls[:1] if self.single else calls
                self.called = bool(self.calls)
            return text
        content, deltas = self.parser.feed(text, self.inner.done)
        deltas = [d for d in deltas if d.index == 0] if self.single else deltas
        self.called = self.called or bool(deltas)
        if not content and not deltas:
            return ""
        return api.Delta(content=content or None, tool_calls=deltas or None)

    def message(self) -> api.AssistantMessage:
        return api.AssistantMessage(content=self.content, tool_calls=self.calls)
