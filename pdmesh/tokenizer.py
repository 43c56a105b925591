"""Tokenization for the coordinator: a Hugging Face checkpoint's tokenizer without transformers.

``Tokenizer.from_dir`` reads ``tokenizer.json`` (the ``tokenizers`` library), ``tokenizer_config.json``
(special tokens, ``add_bos_token``/``add_eos_token``, the chat template), ``chat_template.jinja`` when
present, and the end-of-sequence ids of ``generation_config.json`` and ``config.json``. Its output
matches ``transformers.AutoTokenizer`` for the same directory:

- ``encode(text)`` is ``AutoTokenizer(text)["input_ids"]``: special tokens are added only by
  tokenizer.json's post-processor (transformers 5 ignores ``add_bos_token``/``add_eos_token`` in
  tokenizer_config.json when a tokenizer.json exists, and so does this module);
  ``encode_chat`` is ``apply_chat_template(..., tokenize=True)``, which adds none.
- tokenizer.json's own pipeline (normalizer, pre-tokenizer, decoder) is used as written;
  transformers' model-specific classes (``Qwen2Tokenizer``, ``LlamaTokenizer``) rebuild that
  pipeline from their code, which is the same for checkpoints those classes wrote.
- ``apply_chat_template`` renders the template in a sandboxed Jinja environment set up as
  transformers sets it up (``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``strftime_now``,
  a ``tojson`` that does not escape HTML, the special tokens as variables).

``IncrementalDetokenizer`` turns a stream of token ids into text deltas; it holds back an incomplete
UTF-8 sequence instead of emitting U+FFFD, and its deltas add up to ``decode(all_ids)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
EXTRA_SPECIAL_KEYS = ("additional_special_tokens", "extra_special_tokens")
REPLACEMENT_CHAR = "\ufffd"
# An incomplete UTF-8 sequence is at most 3 bytes (so at most 3 tokens): hold back fewer than this.
MAX_HELD_TOKENS = 4


def _token_content(value: Any) -> str | None:
    """A special token's text from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    return None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _load_chat_template(model_dir: Path, config: dict) -> str | None:
    """``chat_template.jinja`` first (transformers 5 layout), else tokenizer_config's (string or list)."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template if isinstance(template, str) else None


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (assistant masks in transformers): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compiles a chat template in the sandbox transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, chat template, end-of-sequence ids."""

    def __init__(
        self,
        backend: HFTokenizer,
        special_tokens: dict[str, str],
        chat_template: str | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.special_tokens = special_tokens  # bos_token, eos_token, ... -> text
        self.chat_template = chat_template
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_token_ids))

    @classmethod
    def from_dir(cls, model_dir: Path | str) -> Tokenizer:
        """Loads ``tokenizer.json`` and its companions from a Hugging Face checkpoint directory."""
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found (a Hugging Face tokenizer.json is required)")
        backend = HFTokenizer.from_file(str(tokenizer_file))
        config = _read_json(model_dir / "tokenizer_config.json")
        special = {k: c for k in SPECIAL_TOKEN_KEYS if (c := _token_content(config.get(k))) is not None}
        _add_missing_special_tokens(backend, config, special)
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        eos_ids = _as_id_list(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
        eos_ids += _as_id_list(_read_json(model_dir / "config.json").get("eos_token_id"))
        if "eos_token" in special and (eos_id := backend.token_to_id(special["eos_token"])) is not None:
            eos_ids.append(eos_id)
        return cls(backend, special, _load_chat_template(model_dir, config), eos_ids)

    # -- properties ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Every id this tokenizer knows, added tokens included (``len(AutoTokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json or chat_template.jinja)")
        return compile_chat_template(self.chat_template)

    # -- encode and decode --------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; BOS/EOS only where the checkpoint's post-processor adds them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # -- chat ---------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for ``messages``; raises ``jinja2.TemplateError`` when the template refuses them."""
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation")
        # transformers drops None-valued keys: templates handle a missing key better than None
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **kwargs}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        return self._compiled_template.render(
            messages=chat, add_generation_prompt=add_generation_prompt, **variables
        )

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat; the template carries its own special tokens."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


def _add_missing_special_tokens(backend: HFTokenizer, config: dict, special: dict[str, str]) -> None:
    """Special tokens named in tokenizer_config.json but absent from tokenizer.json join the vocab."""
    wanted: list[AddedToken] = []
    for entry in (config.get("added_tokens_decoder") or {}).values():
        if (content := _token_content(entry)) is not None:
            wanted.append(AddedToken(content, special=bool(entry.get("special", True)), normalized=False))
    for key in EXTRA_SPECIAL_KEYS:
        extra = config.get(key) or []
        for value in extra.values() if isinstance(extra, dict) else extra:
            if (content := _token_content(value)) is not None:
                wanted.append(AddedToken(content, special=True, normalized=False))
    wanted += [AddedToken(c, special=True, normalized=False) for c in special.values()]
    missing = [t for t in wanted if backend.token_to_id(t.content) is None]
    if missing:
        backend.add_special_tokens(missing)


class IncrementalDetokenizer:
    """Streams text deltas for token ids fed one chunk at a time.

    Decodes a short window (the tokens of the last emitted delta plus the new ones) and emits what
    the new tokens add to it, so each step costs O(window), not O(sequence). Trailing tokens whose
    text ends in U+FFFD are an incomplete UTF-8 sequence: they are held back until it completes (or,
    for bytes that never form a character, once ``MAX_HELD_TOKENS`` are held). ``flush()`` at the end
    emits what is still held, so the deltas add up to ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # tokens before this are in ``text``

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: Iterable[int]) -> str:
        """Feeds ``token_ids``; returns the new text (possibly empty)."""
        self.token_ids.extend(token_ids)
        return self._step(force=False)

    def flush(self) -> str:
        """Emits whatever is held back (an incomplete sequence becomes U+FFFD, as ``decode`` has it)."""
        return self._step(force=True)

    def _step(self, force: bool) -> str:
        start, read = self._prefix_offset, self._read_offset
        if read >= len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[start:read])
        end = len(self.token_ids)
        new_text = self._decode(self.token_ids[start:end])
        if not force:
            end, new_text = self._complete_end(start, read, end, new_text)
        if new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text) :]
        else:  # the window decodes differently from the whole (rare): fall back to the whole
            delta = self._decode(self.token_ids[:end])[len(self.text) :]
        if not delta and not force:
            return ""  # e.g. a skipped special token: keep the window where it is
        self._prefix_offset, self._read_offset = read, end
        self.text += delta
        return delta

    def _complete_end(self, start: int, read: int, end: int, text: str) -> tuple[int, str]:
        """Drops trailing tokens while the window ends in an incomplete UTF-8 sequence."""
        cut, cut_text = end, text
        while cut > read and cut_text.endswith(REPLACEMENT_CHAR):
            cut -= 1
            cut_text = self._decode(self.token_ids[start:cut])
        if end - cut >= MAX_HELD_TOKENS:  # bytes that will never form a character: let them out
            return end, text
        return cut, cut_text
