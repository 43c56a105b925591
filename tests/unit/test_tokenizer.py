"""pdmesh.tokenizer against transformers.AutoTokenizer on checkpoints written in Hugging Face layout."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from pdmesh.tokenizer import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.timeout(60)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'bad' %}{{ raise_exception('roles must be user, assistant or system') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "你好，世界。机器学习很有趣。",
    "emoji 🎉🚀 café naïve",
    "def f(x):\n    return x * 2\n",
]
SAMPLES = [
    "Hello world!",
    "  leading spaces and\ttabs\n\nnewlines ",
    "你好，世界 and 龘龘 rare characters",
    "emoji 🎉🚀👩‍👩‍👧 café naïve",
    "text with <|im_end|> a special token inside",
    "",
]


def build_tokenizer_dir(
    out: Path, config_extra: dict | None = None, bos_post_processor: bool = False
) -> Path:
    """A small byte-level BPE tokenizer with ChatML special tokens, saved in Hugging Face layout."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    if bos_post_processor:  # Llama 3 style: tokenizer.json itself adds BOS
        bos_id = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos_id)]
        )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHATML,
    }
    config.update(config_extra or {})
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="module")
def tok(chatml_dir) -> Tokenizer:
    return Tokenizer.from_dir(chatml_dir)


def _auto(model_dir: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def _assert_matches_transformers(model_dir: Path) -> None:
    ours, ref = Tokenizer.from_dir(model_dir), _auto(model_dir)
    assert ours.vocab_size == len(ref)
    for text in SAMPLES:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    if ours.chat_template is None:
        return
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "hi 你好 🎉"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "and again"},
    ]
    for gen in (True, False):
        text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == text
        ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert ours.encode_chat(messages, add_generation_prompt=gen) == list(ids)


def test_chatml_tokenizer_matches_transformers(chatml_dir) -> None:
    _assert_matches_transformers(chatml_dir)


@pytest.mark.parametrize(
    ("extra", "bos_post"),
    [
        ({"bos_token": "<|endoftext|>", "add_bos_token": True}, False),
        ({"bos_token": "<|endoftext|>", "add_bos_token": True, "add_eos_token": True}, False),
        ({"bos_token": "<|endoftext|>"}, True),
        ({"bos_token": "<|endoftext|>", "add_bos_token": False}, True),
    ],
)
def test_bos_eos_rules_match_transformers(tmp_path, extra, bos_post) -> None:
    model_dir = build_tokenizer_dir(tmp_path / "m", extra, bos_post_processor=bos_post)
    _assert_matches_transformers(model_dir)


def test_template_sees_special_tokens_and_drops_none(tmp_path) -> None:
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m.get('name', '-') }}{% endfor %}{{ eos_token }}"
    model_dir = build_tokenizer_dir(tmp_path / "m", {"bos_token": "<|endoftext|>", "chat_template": template})
    messages = [{"role": "user", "content": "x", "name": None}]
    ours, ref = Tokenizer.from_dir(model_dir), _auto(model_dir)
    assert ours.apply_chat_template(messages) == "<|endoftext|>[user]-<|im_end|>"
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False)


def test_raise_exception_in_template(tok) -> None:
    with pytest.raises(jinja2.TemplateError, match="roles must be"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])
    with pytest.raises(ValueError):
        tok.apply_chat_template([])


def test_chat_template_sources(tmp_path) -> None:
    listed = [
        {"name": "default", "template": "D{{ messages|length }}"},
        {"name": "tool_use", "template": "T"},
    ]
    model_dir = build_tokenizer_dir(tmp_path / "list", {"chat_template": listed})
    assert Tokenizer.from_dir(model_dir).apply_chat_template([{"role": "user", "content": "x"}]) == "D1"
    (model_dir / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    assert Tokenizer.from_dir(model_dir).apply_chat_template([{"role": "user", "content": "x"}]) == "Jx"
    bare = build_tokenizer_dir(tmp_path / "bare", {"chat_template": None})
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(bare).apply_chat_template([{"role": "user", "content": "x"}])


def test_eos_ids_from_generation_config_and_config(tmp_path) -> None:
    model_dir = build_tokenizer_dir(tmp_path / "m")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    tok = Tokenizer.from_dir(model_dir)
    assert tok.eos_token_ids == [0, 2, 1]
    assert tok.eos_token == "<|im_end|>" and tok.bos_token is None


def test_missing_tokenizer_json(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


def _stream(tok: Tokenizer, ids: list[int], chunk_sizes: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    deltas, pos, i = [], 0, 0
    while pos < len(ids):
        size = chunk_sizes[i % len(chunk_sizes)]
        deltas.append(detok.add(ids[pos : pos + size]))
        pos, i = pos + size, i + 1
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("chunks", [[1], [2], [3, 1], [5]])
def test_incremental_detokenizer_never_emits_partial_utf8(tok, chunks) -> None:
    text = "龘 🎉 naïve 你好，世界 <|im_end|> done 👩‍👩‍👧"
    ids = tok.encode(text)
    assert len(tok.encode("龘")) == 3  # one character split over three byte tokens
    deltas = _stream(tok, ids, chunks)
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_detokenizer_waits_for_the_whole_character(tok) -> None:
    ids = tok.encode("a龘")
    detok = IncrementalDetokenizer(tok)
    assert [detok.add([i]) for i in ids] == ["a", "", "", "龘"]
    assert detok.flush() == ""


def test_incremental_detokenizer_random_ids_add_up_to_decode(tok) -> None:
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            deltas: list[str] = []
            pos = 0
            while pos < len(ids):
                step = rng.randint(1, 3)
                deltas.append(detok.add(ids[pos : pos + step]))
                pos += step
            deltas.append(detok.flush())
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_incomplete_tail_is_flushed_like_decode(tok) -> None:
    ids = tok.encode("ok 龘")[:-1]  # the last character's final byte never comes
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids) == "ok "
    assert detok.flush() == tok.decode(ids)[len("ok ") :]


@pytest.fixture(scope="module")
def modelgen_dir(tmp_path_factory) -> Path:
    from pdmesh.modelgen import write_model

    return write_model("qwen3", tmp_path_factory.mktemp("qwen3"), preset="tiny")


def test_modelgen_checkpoint_matches_transformers(modelgen_dir) -> None:
    _assert_matches_transformers(modelgen_dir)
    tok = Tokenizer.from_dir(modelgen_dir)
    ids = tok.encode("你好 🎉 hello")
    assert "".join(_stream(tok, ids, [1])) == tok.decode(ids)
    assert tok.eos_token_ids
