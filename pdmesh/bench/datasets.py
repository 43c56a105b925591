"""Prompt sources for the serving benchmark: random prompts, ShareGPT conversations and GSM8K.

Every loader returns ``SampleRequest``s (a prompt, its length in tokens, and the number of tokens to
ask for). Lengths are counted with the benchmark's tokenizer when one is given; without one they are
estimates (``estimate_tokens``: about four characters a token), and the server's ``usage`` gives the
real counts afterwards.

- ``random``: with a tokenizer, random non-special token ids decoded to text and re-tokenized until
  the prompt is exactly ``input_len`` tokens; without one, ``input_len`` common English words.
- ``sharegpt``: a JSON list of ``{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}, ...]}``; the first human turn is the prompt and the reply after it
  gives the output length (as vLLM does: pairs shorter than 4 tokens, prompts over 1024 tokens or
  pairs over 2048 tokens are skipped unless ``output_len`` is given).
- ``gsm8k``: JSON lines of ``{"question": ..., "answer": ...}``; the question is the prompt and the
  answer's length is the output length. A directory (as MindIE's ``--DatasetPath`` names) stands
  for its only ``.jsonl`` file, or its ``test.jsonl``.

The file datasets are shuffled with the seed; when they hold fewer usable entries than asked for,
entries are reused (with a warning) so that the run has ``num_prompts`` requests.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

log = logging.getLogger(__name__)

DATASETS = ("random", "sharegpt", "gsm8k")
DEFAULT_INPUT_LEN = 1024
DEFAULT_OUTPUT_LEN = 128
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT = 1024
SHAREGPT_MAX_TOTAL = 2048
MAX_ADJUST_ROUNDS = 16
MAX_DRAWS = 8
REPLACEMENT = "\ufffd"
WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this from "
    "or had by word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over know "
    "water than call first who may down side been now find any new work part take get place made live"
).split()


@dataclass
class SampleRequest:
    """One prompt to send: its text, its length in tokens and how many tokens to ask for."""

    prompt: str
    prompt_len: int
    expected_output_len: int


def load_tokenizer(path: str | Path | None) -> Tokenizer | None:
    """A ``tokenizers.Tokenizer`` from a Hugging Face directory (its tokenizer.json) or the file itself."""
    if path is None:
        return None
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return Tokenizer.from_file(str(file))


def estimate_tokens(text: str) -> int:
    """An estimate of ``text``'s length in tokens without a tokenizer: about four characters a token."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def count_tokens(text: str, tokenizer: Tokenizer | None) -> int:
    """``text``'s length in tokens (no special tokens added), or an estimate without a tokenizer."""
    if tokenizer is None:
        return estimate_tokens(text)
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def _ordinary_ids(tokenizer: Tokenizer) -> np.ndarray:
    """Every token id that is neither an added (special) token nor a fragment of a UTF-8 character.

    Byte-level vocabularies hold tokens that are parts of a multi-byte character; random ones would
    decode to U+FFFD, which re-tokenizes to a different length.
    """
    special = np.fromiter(tokenizer.get_added_tokens_decoder().keys(), dtype=np.int64)
    ids = np.setdiff1d(np.arange(tokenizer.get_vocab_size(with_added_tokens=True)), special)
    texts = tokenizer.decode_batch([[int(i)] for i in ids], skip_special_tokens=True)
    ids = np.array(
        [i for i, text in zip(ids, texts, strict=True) if text and REPLACEMENT not in text], dtype=np.int64
    )
    if ids.size == 0:
        raise ValueError("the tokenizer has no ordinary tokens to build random prompts from")
    return ids


def _adjusted(
    tokenizer: Tokenizer, length: int, rng: np.random.Generator, pool: np.ndarray
) -> tuple[str, int]:
    current = rng.choice(pool, size=length).tolist()
    text, actual = "", 0
    for _ in range(MAX_ADJUST_ROUNDS):
        text = tokenizer.decode(current, skip_special_tokens=True)
        encoded = tokenizer.encode(text, add_special_tokens=False).ids
        actual = len(encoded)
        if actual == length:
            break
        current = (
            encoded[:length] if actual > length else encoded + rng.choice(pool, size=length - actual).tolist()
        )
    return text, actual


def random_token_prompt(
    tokenizer: Tokenizer, length: int, rng: np.random.Generator, ids: np.ndarray | None = None
) -> tuple[str, int]:
    """A prompt of random tokens that re-tokenizes to ``length`` tokens; returns (text, its length).

    Decoding then encoding random ids can merge or split tokens, so the ids are trimmed or topped up
    and tried again, from a fresh draw when that does not settle; failing that, the closest text is
    kept (and its true length returned).
    """
    pool = _ordinary_ids(tokenizer) if ids is None else ids
    best = ("", -1)
    for _ in range(MAX_DRAWS):
        text, actual = _adjusted(tokenizer, length, rng, pool)
        if actual == length:
            return text, actual
        if abs(actual - length) < abs(best[1] - length):
            best = (text, actual)
    log.debug("random prompt of %d tokens re-tokenizes to %d", length, best[1])
    return best


def load_random(
    num_prompts: int, input_len: int, output_len: int, tokenizer: Tokenizer | None, seed: int = 0
) -> list[SampleRequest]:
    """``num_prompts`` random prompts of ``input_len`` tokens (words without a tokenizer)."""
    if input_len < 1 or output_len < 1:
        raise ValueError("--input-len and --output-len must be at least 1")
    rng = np.random.default_rng(seed)
    samples = []
    pool = _ordinary_ids(tokenizer) if tokenizer is not None else None
    for _ in range(num_prompts):
        if tokenizer is None:
            text, length = " ".join(rng.choice(WORDS, size=input_len).tolist()), input_len
        else:
            text, length = random_token_prompt(tokenizer, input_len, rng, pool)
        samples.append(SampleRequest(text, length, output_len))
    return samples


def _fill(samples: list[SampleRequest], num_prompts: int, source: str) -> list[SampleRequest]:
    if not samples:
        raise ValueError(f"{source} has no usable entries")
    if len(samples) < num_prompts:
        log.warning(
            "%s has %d usable entries for %d prompts; reusing entries", source, len(samples), num_prompts
        )
    return [samples[i % len(samples)] for i in range(num_prompts)]


def _sharegpt_pairs(path: Path) -> list[tuple[str, str]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        for first, second in zip(turns, turns[1:], strict=False):
            if first.get("from") in ("human", "user") and second.get("from") in (
                "gpt",
                "assistant",
                "chatgpt",
            ):
                pairs.append((str(first.get("value", "")), str(second.get("value", ""))))
                break
    return pairs


def load_sharegpt(
    path: str | Path,
    num_prompts: int,
    tokenizer: Tokenizer | None,
    output_len: int | None = None,
    seed: int = 0,
) -> list[SampleRequest]:
    """Prompts from a ShareGPT JSON file (first human turn; the reply's length unless ``output_len``)."""
    path = Path(path)
    pairs = _sharegpt_pairs(path)
    order = np.random.default_rng(seed).permutation(len(pairs))
    samples: list[SampleRequest] = []
    for index in order:
        prompt, completion = pairs[int(index)]
        prompt_len = count_tokens(prompt, tokenizer)
        out_len = output_len if output_len is not None else count_tokens(completion, tokenizer)
        if output_len is None and (prompt_len < SHAREGPT_MIN_LEN or out_len < SHAREGPT_MIN_LEN):
            continue
        if output_len is None and (
            prompt_len > SHAREGPT_MAX_PROMPT or prompt_len + out_len > SHAREGPT_MAX_TOTAL
        ):
            continue
        if prompt_len < 1:
            continue
        samples.append(SampleRequest(prompt, prompt_len, out_len))
        if len(samples) == num_prompts:
            break
    return _fill(samples, num_prompts, str(path))


def _gsm8k_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "question" not in row:
            raise ValueError(f"{path}:{number}: a GSM8K line is an object with 'question' and 'answer'")
        rows.append(row)
    return rows


def load_gsm8k(
    path: str | Path,
    num_prompts: int,
    tokenizer: Tokenizer | None,
    output_len: int | None = None,
    seed: int = 0,
) -> list[SampleRequest]:
    """Prompts from a GSM8K JSONL file (the question; the answer's length unless ``output_len``)."""
    path = Path(path)
    rows = _gsm8k_rows(path)
    order = np.random.default_rng(seed).permutation(len(rows))
    samples = []
    for index in order[:num_prompts]:
        row = rows[int(index)]
        prompt = str(row["question"])
        out_len = (
            output_len if output_len is not None else count_tokens(str(row.get("answer", "")), tokenizer)
        )
        samples.append(SampleRequest(prompt, count_tokens(prompt, tokenizer), max(1, out_len)))
    return _fill(samples, num_prompts, str(path))


def dataset_file(directory: Path, name: str) -> Path:
    """The file of a dataset directory (MindIE's --DatasetPath names one): its only .jsonl/.json
    file, or test.jsonl among several; ValueError naming what was found otherwise."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".jsonl", ".json") and p.is_file())
    if len(files) == 1:
        return files[0]
    preferred = directory / "test.jsonl"
    if preferred in files:
        return preferred
    found = ", ".join(p.name for p in files) or "no .jsonl or .json file"
    raise ValueError(f"{directory}: which {name} file? found {found} (name one, or keep test.jsonl)")


def load_dataset(
    name: str,
    num_prompts: int,
    tokenizer: Tokenizer | None = None,
    path: str | Path | None = None,
    input_len: int | None = None,
    output_len: int | None = None,
    seed: int = 0,
) -> list[SampleRequest]:
    """The ``num_prompts`` requests of dataset ``name`` (one of ``DATASETS``)."""
    if num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    if name == "random":
        return load_random(
            num_prompts, input_len or DEFAULT_INPUT_LEN, output_len or DEFAULT_OUTPUT_LEN, tokenizer, seed
        )
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    if path is None:
        raise ValueError(f"the {name} dataset needs --dataset-path")
    if Path(path).is_dir():
        path = dataset_file(Path(path), name)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no dataset file at {path}")
    loader = load_sharegpt if name == "sharegpt" else load_gsm8k
    return loader(path, num_prompts, tokenizer, output_len, seed)
