"""Structured outputs: a ``StructuredOutput`` as an llguidance grammar, and its validation.

llguidance (guidance-ai's grammar engine, the one vLLM's ``guidance`` backend uses) enforces the
constraint: it builds its tokenizer from the checkpoint's ``tokenizer.json`` through the
``tokenizers`` library pdmesh already loads, and has no Python dependencies, so a worker image needs
neither transformers nor torch extras for it (xgrammar's wheel requires transformers and triton).

``grammar_of`` turns each kind into llguidance's grammar text; ``check`` compiles it without a
tokenizer (no vocabulary needed to find a malformed schema, regex or grammar), so the coordinator
refuses a bad constraint with a 400 before any worker sees it. JSON is generated compact, with
``", "`` and ``": "`` separators and no other whitespace: a free whitespace pattern would let a
model spend its whole budget on blanks. A schema may override this with llguidance's own
``"x-guidance"`` options (e.g. ``{"whitespace_flexible": true}``).

Nothing here imports torch: the coordinator uses it as the engine does.
"""

from __future__ import annotations

import json

import llguidance

from pdmesh.generation import StructuredOutput

# llguidance's JSON options applied before the schema's own "x-guidance" ones.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}

# How an error names the constraint, by kind.
WHAT = {
    "json_object": "JSON object constraint",
    "json_schema": "JSON schema",
    "regex": "regex",
    "choice": "choice list",
    "grammar": "grammar",
}


def _schema(spec: str) -> dict:
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON schema: not JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise ValueError("invalid JSON schema: it must be a JSON object")
    return schema


def _choices(spec: str) -> list[str]:
    try:
        choices = json.loads(spec)
    except json.JSONDecodeError:
        choices = None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError("invalid choice list: it must be a non-empty JSON list of strings")
    return choices


def grammar_of(structured: StructuredOutput) -> str:
    """llguidance's grammar text for ``structured``; ValueError when its spec is not even well formed
    (a schema that is not a JSON object, a choice list that is not a list of strings)."""
    kind, spec = structured.kind, structured.spec
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_DEFAULTS)
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(_schema(spec), defaults=JSON_DEFAULTS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        return llguidance.grammar_from("choice", json.dumps(_choices(spec)))
    if kind == "grammar":
        try:  # Lark as written; GBNF (llama.cpp's, vLLM's EBNF) converted to Lark
            return llguidance.grammar_from("grammar", spec)
        except ValueError as exc:
            raise ValueError(f"invalid grammar: {exc}") from None
    raise ValueError(f"unknown structured output kind {kind!r}")


def check(structured: StructuredOutput) -> str:
    """Compiles ``structured``; returns its grammar text, or raises ValueError saying what is wrong."""
    structured.validate()
    grammar = grammar_of(structured)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:  # one line: llguidance's message spans several, with a caret under the fault
        raise ValueError(f"invalid {WHAT[structured.kind]}: {' '.join(messages[0].split())}")
    return grammar
