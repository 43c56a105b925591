"""write_model: deterministic checkpoints in Hugging Face layout; loading single and sharded weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdmesh.modelgen import write_model
from pdmesh.modelgen.writer import write_shards
from pdmesh.models import AttentionMetadata, load_model

pytestmark = pytest.mark.timeout(60)


def test_checkpoint_files_and_determinism(tiny_qwen3, tmp_path) -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (tiny_qwen3 / name).exists(), name
    config = json.loads((tiny_qwen3 / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "float32"
    again = write_model("qwen3", tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny_qwen3 / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_text() == (tiny_qwen3 / "tokenizer.json").read_text()
    other = write_model("qwen3", tmp_path / "other", seed=1, num_hidden_layers=1)
    assert json.loads((other / "config.json").read_text())["num_hidden_layers"] == 1


def test_unknown_arch_preset_dtype_are_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        write_model("nope", tmp_path)
    with pytest.raises(ValueError, match="unknown preset"):
        write_model("qwen3", tmp_path, preset="huge")
    with pytest.raises(ValueError, match="unknown dtype"):
        write_model("qwen3", tmp_path, dtype="int8")


def _logits(model_dir, dtype: str = "float32") -> torch.Tensor:
    model, cfg = load_model(model_dir, dtype, "cpu")
    pool = torch.zeros(
        (2, cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim), dtype=getattr(torch, dtype)
    )
    model.bind_kv_cache(pool)
    ids = torch.tensor([5, 9, 200, 31, 7])
    slots = torch.arange(5)
    meta = AttentionMetadata(True, slots // 16, slots % 16, torch.zeros(1, 1, dtype=torch.long), [5], [5])
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(5), meta)).float()


def test_sharded_checkpoint_loads_the_same(tiny_qwen3, tmp_path) -> None:
    weights = load_file(str(tiny_qwen3 / "model.safetensors"))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file in ("config.json", "generation_config.json"):
        (tmp_path / file).write_text((tiny_qwen3 / file).read_text())
    write_shards(tmp_path, weights, shards)
    assert torch.equal(_logits(tmp_path), _logits(tiny_qwen3))


def test_bfloat16_load_is_close(tiny_qwen3) -> None:
    full, half = _logits(tiny_qwen3), _logits(tiny_qwen3, "bfloat16")
    assert (full - half).abs().max().item() < 0.25


def test_missing_weight_is_reported(tiny_qwen3, tmp_path) -> None:
    weights = load_file(str(tiny_qwen3 / "model.safetensors"))
    weights.pop("model.norm.weight")
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_qwen3 / "config.json").read_text())
    with pytest.raises(ValueError, match="lacks"):
        load_model(tmp_path)
