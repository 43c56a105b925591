"""The KV layout names a checkpoint by its content, not by its directory's name."""

from __future__ import annotations

import shutil

import pytest

from pdmesh.modelgen import write_model
from pdmesh.models.config import ModelConfig

pytestmark = pytest.mark.timeout(60)


def test_a_copy_under_another_name_shares_kv_and_other_weights_do_not(tiny_qwen3, tmp_path) -> None:
    copy = tmp_path / "mounted-elsewhere"
    shutil.copytree(tiny_qwen3, copy)
    original = ModelConfig.from_dir(tiny_qwen3).fingerprint()
    assert ModelConfig.from_dir(copy).fingerprint() == original

    other = write_model("qwen3", tmp_path / tiny_qwen3.name, preset="tiny", seed=1234)
    assert other.name == tiny_qwen3.name  # the same name and shapes, other weights
    assert ModelConfig.from_dir(other).fingerprint() != original
