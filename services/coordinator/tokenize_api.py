"""``POST /tokenize`` and ``POST /detokenize`` as vLLM serves them.

- ``/tokenize`` takes a ``prompt`` (encoded with the tokenizer's special tokens unless
  ``add_special_tokens`` is false) or chat ``messages`` (rendered with the chat template as
  ``/v1/chat/completions`` renders them; ``add_generation_prompt`` (default true) or
  ``continue_final_message`` (the text ends with the last message's content, left open);
  ``add_special_tokens`` default false, the template carrying its own). It answers ``tokens``, their
  ``count``, the model's ``max_model_len`` and, with ``return_token_strs``, each token's string
  (``token_strs``, null otherwise).
- ``/detokenize`` takes ``tokens`` (ids below the vocabulary size) and answers their text as
  ``prompt``, special tokens included (as vLLM decodes).

``model``, when given, must be the model served (else 404). Unknown fields are refused (400).
"""

from __future__ import annotations

from typing import Annotated, Any

import jinja2
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from services.coordinator import http_schema, request_fields
from services.coordinator import openai_api as api
from services.coordinator.http_errors import ApiError
from services.coordinator.validation import check_token_ids

_STRICT = ConfigDict(extra="forbid", **api.STRICT)


class TokenizeCompletionRequest(BaseModel):
    """A text prompt to tokenize."""

    model_config = _STRICT

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(BaseModel):
    """Chat messages to render with the chat template and tokenize."""

    model_config = _STRICT

    model: str | None = None
    messages: Annotated[list[api.ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False


def _kind(body: Any) -> str:
    """Chat when the body has ``messages``: only the chosen model's errors are answered."""
    is_chat = isinstance(body, dict) and "messages" in body
    return TokenizeChatRequest.__name__ if is_chat else TokenizeCompletionRequest.__name__


TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag(TokenizeCompletionRequest.__name__)]
    | Annotated[TokenizeChatRequest, Tag(TokenizeChatRequest.__name__)],
    Discriminator(_kind),
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = _STRICT

    model: str | None = None
    tokens: list[api.TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


REQUESTS = (TokenizeCompletionRequest, TokenizeChatRequest, DetokenizeRequest)

router = APIRouter()
_ANSWERS = {k: v for k, v in http_schema.ERROR_RESPONSES.items() if k in (400, 404, 415, 500)}


def _check_model(server, model: str | None) -> None:
    if model is not None and model != server.model_name:
        raise ApiError(f"The model `{model}` does not exist.", 404, "model", "model_not_found")


def _chat_text(server, body: TokenizeChatRequest) -> str:
    if body.continue_final_message and body.add_generation_prompt:
        raise ApiError(
            "continue_final_message and add_generation_prompt cannot both be true",
            param="continue_final_message",
        )
    messages = [server._message_dict(i, m) for i, m in enumerate(body.messages)]
    messages = request_fields.template_roles(messages, server.tokenizer.chat_template)
    try:
        text = server.tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt
        )
    except jinja2.TemplateError as exc:
        raise ApiError(f"the chat template refused the messages: {exc}", param="messages") from exc
    except ValueError as exc:
        raise ApiError(str(exc), param="messages") from exc
    if not body.continue_final_message:
        return text
    # vLLM's rule: the rendered chat ends where the last message's content does (no end-of-turn).
    last = messages[-1].get("content") or ""
    end = text.rfind(last) if last else -1
    if end < 0:
        where = f"messages.{len(messages) - 1}.content"
        raise ApiError("continue_final_message needs the last message's text in the prompt", param=where)
    return text[: end + len(last)]


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ANSWERS)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    server = request.app.state.server
    _check_model(server, body.model)
    if isinstance(body, TokenizeChatRequest):
        text = _chat_text(server, body)
    else:
        text = body.prompt
    ids = server.tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
    strs = [server.tokenizer.backend.id_to_token(t) for t in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=server.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ANSWERS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    server = request.app.state.server
    _check_model(server, body.model)
    try:
        check_token_ids(body.tokens, server.tokenizer.vocab_size, "tokens")
    except ValueError as exc:
        raise ApiError(str(exc), param="tokens") from None
    return DetokenizeResponse(prompt=server.tokenizer.decode(body.tokens, skip_special_tokens=False))
