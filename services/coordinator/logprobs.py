"""OpenAI ``logprobs`` for the HTTP front: request checks and the two response shapes.

- Chat completions (``logprobs: true``, ``top_logprobs`` 0..20): ``{"content": [{"token",
  "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}``.
- Completions (``logprobs`` 0..20): ``{"tokens", "token_logprobs", "top_logprobs": [{token:
  logprob}, ...], "text_offset"}``; ``text_offset`` counts characters from the completion's start.

A token's string is the tokenizer's text for that one id (special tokens included); ``bytes`` are
its UTF-8 bytes, or the token's raw bytes when it holds part of a UTF-8 sequence (byte-level BPE,
``<0xNN>`` byte fallback). The engine asks for at least one top token, so that ``top_logprobs`` 0
still has the chosen tokens' logprobs; the top lists are trimmed to what the request asked.
"""

from __future__ import annotations

import re

from pdmesh.tokenizer import REPLACEMENT_CHAR, Tokenizer
from services.coordinator import openai_api as api
from services.coordinator.http_errors import ApiError
from services.coordinator.text_stream import TokenEntry

MAX_TOP_LOGPROBS = 20
FLOOR = -9999.0  # what OpenAI answers for a logprob of -inf (JSON has no infinity)
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def check_request(body: api.SamplingRequest) -> None:
    """Raises ApiError for logprobs fields OpenAI refuses (or out of the engine's 0..20)."""
    if isinstance(body, api.ChatCompletionRequest):
        if body.top_logprobs is None:
            return
        if not body.logprobs:
            raise ApiError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
    elif isinstance(body, api.CompletionRequest) and body.logprobs is not None:
        if not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="logprobs")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character standing for each byte -> the byte."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES_OF = _byte_decoder()


class TokenTexts:
    """Each token id's string and bytes, computed once per id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            found = self._cache[token_id] = (text, list(self._bytes(token_id, text)))
        return found

    def _bytes(self, token_id: int, text: str) -> bytes:
        if REPLACEMENT_CHAR not in text:
            return text.encode("utf-8")
        raw = self.tokenizer.backend.id_to_token(token_id) or ""
        if raw and all(c in _BYTES_OF for c in raw):
            return bytes(_BYTES_OF[c] for c in raw)
        if match := _BYTE_FALLBACK.fullmatch(raw):
            return bytes([int(match.group(1), 16)])
        return text.encode("utf-8")


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def render(texts: TokenTexts, entries: list[TokenEntry], top: int | None, chat: bool) -> dict | None:
    """The ``logprobs`` object of a choice (or stream chunk) for ``entries``; None when not asked."""
    if top is None:
        return None
    return _chat(texts, entries, top) if chat else _completion(texts, entries, top)


def _chat(texts: TokenTexts, entries: list[TokenEntry], top: int) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text, raw = texts.get(token_id)
        return {"token": text, "logprob": _value(logprob), "bytes": raw}

    content = []
    for entry in entries:
        chosen, alternatives = entry.logprobs
        alts = list(alternatives.items())[:top]
        content.append({**item(entry.token_id, chosen), "top_logprobs": [item(t, v) for t, v in alts]})
    return {"content": content}


def _completion(texts: TokenTexts, entries: list[TokenEntry], top: int) -> dict:
    result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in entries:
        chosen, alternatives = entry.logprobs
        result["tokens"].append(texts.get(entry.token_id)[0])
        result["token_logprobs"].append(_value(chosen))
        alts = list(alternatives.items())[:top]
        result["top_logprobs"].append({texts.get(t)[0]: _value(v) for t, v in alts})
        result["text_offset"].append(entry.offset)
    return result
