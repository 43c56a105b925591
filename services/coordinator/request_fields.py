"""Never silently ignore: how the HTTP front treats request fields it does not declare.

Every request model forbids undeclared fields (pydantic ``extra="forbid"``), so a field is accepted
only when a model declares it, and then pdmesh does what the field asks. What is left:

- A field no model declares is refused with 400 ``Unrecognized request argument supplied: NAME``
  (``param``: the field's path), as OpenAI words it (http_errors.py).
- A field OpenAI or vLLM define but pdmesh does not implement (``REFUSED``) is refused by name with
  the reason (``NAME is not supported by pdmesh: ...``), unless it asks for nothing: ``null``, or the
  one value that is pdmesh's fixed behaviour (``include_stop_str_in_output: false``). Those values are
  dropped before validation, so a client that serializes every default still works.

``screen`` applies this to a request model's input (a ``model_validator(mode="before")``); a field
a model declares is never screened, so a feature that declares a field turns it on by itself.
Message roles: ``ROLES``; ``template_roles`` hands a ``developer`` message to a chat template that
knows no such role as a ``system`` message (OpenAI's meaning), rather than letting it drop it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticCustomError

ROLES = ("system", "user", "assistant", "tool", "developer")

# The error type ``screen`` raises (http_errors.py answers it 400 with ``param`` = the field).
UNSUPPORTED = "unsupported_field"

_NOT_STORED = "pdmesh keeps no completions"
_ONE_TIER = "pdmesh serves every request alike"
_TEMPLATE = "pdmesh renders the checkpoint's own chat template as it is"

# name -> (the values that ask for pdmesh's fixed behaviour, why anything else is refused).
# Only fields that no model declares are screened; ``null`` is always accepted.
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    # OpenAI
    "logit_bias": (({},), "the sampler has no per-token logit biases"),
    "suffix": ((), "text after the completion (insertion) is not implemented"),
    "functions": ((), "the deprecated functions API is not implemented"),
    "function_call": ((), "the deprecated functions API is not implemented"),
    "audio": ((), "pdmesh serves text models"),
    "modalities": ((["text"],), "pdmesh serves text models: text output only"),
    "prediction": ((), "predicted outputs are not implemented"),
    "web_search_options": ((), "pdmesh has no web search"),
    "reasoning_effort": ((), "the model's reasoning is not configurable"),
    "verbosity": ((), "the model's verbosity is not configurable"),
    "service_tier": (("auto", "default"), _ONE_TIER),
    "store": ((False,), _NOT_STORED),
    "metadata": ((), f"metadata tags stored completions, and {_NOT_STORED}"),
    # vLLM's extras
    "use_beam_search": ((False,), "beam search is not implemented"),
    "length_penalty": ((1, 1.0), "beam search is not implemented"),
    "min_tokens": ((0,), "a minimum completion length is not implemented"),
    "include_stop_str_in_output": ((False,), "stop strings are always cut from the text"),
    "skip_special_tokens": ((True,), "special tokens are always left out of the text"),
    "spaces_between_special_tokens": ((True,), "special tokens are always left out of the text"),
    "truncate_prompt_tokens": ((), "prompts are never truncated: a prompt too long is refused"),
    "allowed_token_ids": ((), "the sampler has no allow-list of tokens"),
    "bad_words": ((), "the sampler has no list of banned words"),
    "logits_processors": ((), "custom logits processors are not implemented"),
    "add_special_tokens": ((), "prompts are encoded as the endpoint does (docs/api.md)"),
    "add_generation_prompt": ((True,), "the generation prompt is always added"),
    "continue_final_message": ((False,), "the chat always continues with a new assistant turn"),
    "documents": ((), _TEMPLATE),
    "chat_template": ((), _TEMPLATE),
    "chat_template_kwargs": ((), _TEMPLATE),
    "mm_processor_kwargs": ((), "pdmesh serves text models"),
    "priority": ((0,), _ONE_TIER),
    "request_id": ((), "send it as the X-Request-Id header"),
    "return_tokens_as_token_ids": ((), "tokens are returned as text"),
    "return_token_ids": ((), "tokens are returned as text"),
    "cache_salt": ((), "the prefix cache is shared by every request"),
    "kv_transfer_params": ((), "pdmesh moves the KV cache itself"),
    "vllm_xargs": ((), "vLLM's extension arguments are not implemented"),
}


def _asks_nothing(value: Any, accepted: tuple[Any, ...]) -> bool:
    # type() equality too: True == 1 in Python, but "min_tokens": true is no integer.
    return value is None or any(value == a and type(value) is type(a) for a in accepted)


def screen(model: type[BaseModel], data: Any, refused: dict[str, tuple[tuple[Any, ...], str]]) -> Any:
    """``data`` without the undeclared ``refused`` fields that ask for nothing; raises for one that
    asks for something pdmesh does not do. Other undeclared fields are left for ``extra="forbid"``."""
    if not isinstance(data, dict):
        return data
    kept = dict(data)
    declared = {*model.model_fields, *(f.alias for f in model.model_fields.values() if f.alias)}
    for name, value in data.items():
        if name in declared or name not in refused:
            continue
        accepted, why = refused[name]
        if not _asks_nothing(value, accepted):
            raise PydanticCustomError(
                UNSUPPORTED, "{field} is not supported by pdmesh: {why}", {"field": name, "why": why}
            )
        del kept[name]
    return kept


def unrecognized_message(names: list[str]) -> str:
    """OpenAI's words for fields it does not know."""
    if len(names) == 1:
        return f"Unrecognized request argument supplied: {names[0]}"
    return f"Unrecognized request arguments supplied: {', '.join(names)}"


def template_roles(messages: list[dict], chat_template: str | None) -> list[dict]:
    """``developer`` messages as ``system`` ones for a template that does not name the role (which
    would otherwise drop them without a word)."""
    if chat_template is not None and "developer" in chat_template:
        return messages
    return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
