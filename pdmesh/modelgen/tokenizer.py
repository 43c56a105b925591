"""A real byte-level BPE tokenizer in Qwen's layout, trained on the corpus the project ships.

Training takes a fraction of a second on the small corpus and is deterministic; the result is
cached per process, so every checkpoint written in one process shares one ``tokenizer.json``.
"""

from __future__ import annotations

import functools
import json
import logging
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

from pdmesh.modelgen.chat_templates import CHATML_TEMPLATE

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DEFAULT_VOCAB_SIZE = 1024
# Qwen2/Qwen3's pre-tokenizer split pattern.
QWEN_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def corpus_text() -> str:
    """The English text the tokenizer is trained on."""
    return resources.files("pdmesh.modelgen").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


@functools.lru_cache(maxsize=4)
def trained_tokenizer_json(vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """``tokenizer.json`` text of a BPE with ``vocab_size`` entries, the special tokens last."""
    tok = _new_tokenizer()
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    log.debug("trained a BPE tokenizer with %d entries", tok.get_vocab_size())
    return tok.to_str()


def special_token_ids(tokenizer_json: str) -> dict[str, int]:
    """The ids of the special tokens in a ``tokenizer.json`` text."""
    tok = Tokenizer.from_str(tokenizer_json)
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def write_tokenizer(
    out_dir: Path, vocab_size: int = DEFAULT_VOCAB_SIZE, chat_template: str = CHATML_TEMPLATE
) -> dict[str, int]:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (with ``chat_template``); returns the
    special token ids."""
    text = trained_tokenizer_json(vocab_size)
    (out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    ids = special_token_ids(text)
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in ids.items()
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return ids


def tokenizer_vocab_size(vocab_size: int = DEFAULT_VOCAB_SIZE) -> int:
    """How many entries the trained tokenizer really has (specials included)."""
    return Tokenizer.from_str(trained_tokenizer_json(vocab_size)).get_vocab_size()
