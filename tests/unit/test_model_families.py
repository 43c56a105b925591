"""Llama / Qwen2 / Qwen3-MoE pieces against transformers' definitions, and their checkpoint writers."""

from __future__ import annotations

import json

import pytest
import torch

from pdmesh.cli import main
from pdmesh.modelgen import get_arch, write_model
from pdmesh.models.config import ModelConfig
from pdmesh.models.layers import default_inv_freq, rope_inv_freq
from pdmesh.models.moe import RoutedExperts, SoftmaxTopKRouter
from pdmesh.models.qwen3_moe import is_sparse_layer

pytestmark = pytest.mark.timeout(60)

FAMILIES = ("llama", "qwen2", "qwen3_moe")


def _config(arch: str, preset: str, **overrides) -> dict:
    writer = get_arch(arch)
    fields = {**writer.presets[preset], "vocab_size": 1024, **overrides}
    fields.pop("init_std")
    return writer.build_config(fields, {"<|endoftext|>": 0, "<|im_end|>": 2}, "float32")


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_llama3_rope_matches_transformers(preset) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = _config("llama", preset)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**raw), "cpu")
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_type == "llama3"
    ours = rope_inv_freq(cfg)
    assert torch.equal(ours, ref)
    if preset == "tiny":  # kept, smoothed and divided frequencies all occur
        ratio = ours / default_inv_freq(cfg.head_dim, cfg.rope_theta)
        factor = raw["rope_scaling"]["factor"]
        assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(1 / factor)).any()
        assert ((ratio < 1) & (ratio > 1 / factor + 1e-6)).any()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"decoder_sparse_step": 2, "mlp_only_layers": []},
        {"decoder_sparse_step": 3, "mlp_only_layers": [2]},
    ],
)
def test_sparse_layers_as_transformers_decides(overrides) -> None:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer, Qwen3MoeSparseMoeBlock

    raw = _config("qwen3_moe", "tiny", num_hidden_layers=6, **overrides)
    hf_config = Qwen3MoeConfig(**raw)
    for layer in range(6):
        hf_sparse = isinstance(Qwen3MoeDecoderLayer(hf_config, layer).mlp, Qwen3MoeSparseMoeBlock)
        assert is_sparse_layer(raw, layer) == hf_sparse, (overrides, layer)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_routed_experts_equal_a_per_token_reference(norm_topk_prob) -> None:
    gen = torch.Generator().manual_seed(0)
    experts, hidden, inter, k, t = 6, 16, 8, 2, 11
    router = SoftmaxTopKRouter(experts, hidden, k, norm_topk_prob)
    moe = RoutedExperts(experts, hidden, inter)
    router.weight.data = torch.randn(experts, hidden, generator=gen)
    moe.gate_up.weight.data = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.3
    moe.down.weight.data = torch.randn(experts, hidden, inter, generator=gen) * 0.3
    x = torch.randn(t, hidden, generator=gen)
    weights, ids = router(x)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    for i in range(t):
        top = probs[i].topk(k)
        want = top.values / top.values.sum() if norm_topk_prob else top.values
        assert torch.allclose(weights[i], want) and torch.equal(ids[i], top.indices)
    ref = torch.zeros_like(x)
    for i in range(t):
        for w, e in zip(weights[i], ids[i], strict=True):
            gate, up = (moe.gate_up.weight[e] @ x[i]).split(inter)
            ref[i] += w * (moe.down.weight[e] @ (torch.nn.functional.silu(gate) * up))
    with torch.no_grad():
        assert torch.allclose(moe(x, weights, ids), ref, atol=1e-5)


@pytest.mark.parametrize("arch", FAMILIES)
def test_make_model_writes_the_family(arch, tmp_path, capsys) -> None:
    out = tmp_path / arch
    assert main(["make-model", "--arch", arch, "--preset", "tiny", "--out", str(out)]) == 0
    assert f"wrote {arch}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch
    again = write_model(arch, tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
