"""A DeepSeek-V3 checkpoint in the released format (FP8 tiles + scales, MTP layer, shards) loads.

The FP8 directory is made from the tiny random checkpoint: every projection weight is quantized to
``float8_e4m3fn`` with one scale per tile (tiles that do not divide the shapes, to cover partial
edge tiles), with the scales in another shard than their weights, and
an extra multi-token-prediction layer is appended. The reference directory holds the same weights
dequantized in float32, without quantization config; the engine must load both identically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import SamplingParams
from pdmesh.modelgen.writer import write_shards
from pdmesh.models import load_model
from pdmesh.models.fp8 import SCALE_SUFFIX

pytestmark = pytest.mark.timeout(120)

TILE = (16, 24)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FP8 weight, per-tile scale, the float32 weight they stand for)."""
    rows, cols = weight.shape
    tiles = (-(-rows // TILE[0]), -(-cols // TILE[1]))
    scale = torch.empty(tiles)
    for i in range(tiles[0]):
        for j in range(tiles[1]):
            tile = weight[i * TILE[0] : (i + 1) * TILE[0], j * TILE[1] : (j + 1) * TILE[1]]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / FP8_MAX
    full = scale.repeat_interleave(TILE[0], 0)[:rows].repeat_interleave(TILE[1], 1)[:, :cols]
    q = (weight / full).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


def _is_projection(name: str) -> bool:
    return name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight")


def _mtp_tensors(weights: dict[str, torch.Tensor], layer: int, num_layers: int) -> dict[str, torch.Tensor]:
    """An MTP layer as released: a copy of the last decoder layer plus its own norms and projection."""
    prefix = f"model.layers.{num_layers - 1}."
    mtp = {
        k.replace(prefix, f"model.layers.{layer}."): v.clone()
        for k, v in weights.items()
        if k.startswith(prefix)
    }
    hidden = weights["model.embed_tokens.weight"].shape[1]
    mtp[f"model.layers.{layer}.enorm.weight"] = torch.ones(hidden)
    mtp[f"model.layers.{layer}.hnorm.weight"] = torch.ones(hidden)
    mtp[f"model.layers.{layer}.eh_proj.weight"] = torch.randn(hidden, 2 * hidden)
    mtp[f"model.layers.{layer}.shared_head.norm.weight"] = torch.ones(hidden)
    return mtp


@pytest.fixture(scope="module")
def fp8_and_reference(model_factory, tmp_path_factory) -> tuple[Path, Path]:
    source = model_factory("deepseek_v3", "tiny")
    config = json.loads((source / "config.json").read_text())
    weights = load_file(str(source / "model.safetensors"))
    stored, dequantized = {}, {}
    for name, tensor in weights.items():
        if _is_projection(name):
            q, scale, real = _quantize(tensor.float())
            stored[name], stored[name + SCALE_SUFFIX], dequantized[name] = q, scale, real
        else:
            stored[name] = dequantized[name] = tensor
    stored.update(_mtp_tensors(stored, config["num_hidden_layers"], config["num_hidden_layers"]))

    reference = tmp_path_factory.mktemp("dsv3-dequantized")
    fp8_dir = tmp_path_factory.mktemp("dsv3-fp8")
    for out in (reference, fp8_dir):
        for extra in source.iterdir():
            if extra.suffix != ".safetensors":
                shutil.copy(extra, out / extra.name)
    save_file(dequantized, str(reference / "model.safetensors"))

    config.update(
        num_nextn_predict_layers=1,
        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(TILE)},
    )
    (fp8_dir / "config.json").write_text(json.dumps(config))
    scales = [k for k in stored if k.endswith(SCALE_SUFFIX)]  # in another shard than their weights
    shards = {
        "model-00001-of-00002.safetensors": [k for k in stored if not k.endswith(SCALE_SUFFIX)],
        "model-00002-of-00002.safetensors": scales,
    }
    write_shards(fp8_dir, stored, shards)
    return fp8_dir, reference


def test_fp8_tiles_are_dequantized_and_the_mtp_layer_skipped(fp8_and_reference) -> None:
    fp8_dir, reference = fp8_and_reference
    got, _ = load_model(fp8_dir, dtype="float32")
    want, _ = load_model(reference, dtype="float32")
    want_params = dict(want.named_parameters())
    for name, param in got.named_parameters():
        assert torch.equal(param, want_params[name]), name


def test_fp8_checkpoint_generates_the_reference_tokens(fp8_and_reference) -> None:
    outputs = []
    for model_dir in fp8_and_reference:
        engine = LLMEngine(EngineConfig(model_dir=model_dir, num_blocks=64))
        engine.add_request(EngineRequest("r", [5, 17, 42, 7], SamplingParams(temperature=0, max_tokens=12)))
        tokens: list[int] = []
        while engine.has_unfinished():
            tokens += [t for out in engine.step() for t in out.token_ids]
        outputs.append(tokens)
    assert len(outputs[0]) == 12 and outputs[0] == outputs[1]


def test_fp8_weight_without_its_scale_is_refused(fp8_and_reference, tmp_path) -> None:
    fp8_dir, _ = fp8_and_reference
    broken = tmp_path / "broken"
    shutil.copytree(fp8_dir, broken)
    for shard in broken.glob("*.safetensors"):
        tensors = load_file(str(shard))
        save_file({k: v for k, v in tensors.items() if "o_proj.weight_scale_inv" not in k}, str(shard))
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if "o_proj.weight_scale_inv" not in k}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"o_proj.weight is FP8 but the checkpoint has no block scale"):
        load_model(broken, dtype="float32")


def test_unsupported_quantization_is_refused(fp8_and_reference, tmp_path) -> None:
    fp8_dir, _ = fp8_and_reference
    other = tmp_path / "awq"
    shutil.copytree(fp8_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantization method 'awq' is not supported"):
        load_model(other, dtype="float32")
