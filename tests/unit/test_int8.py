"""W8A8 INT8 products against a float64 numpy reference of the same arithmetic, and the formats' checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pdmesh import accelerator
from pdmesh.models import int8_formats
from pdmesh.models.int8 import Int8Linear, Int8StackedExperts
from tests.int8_reference import reference_product

pytestmark = pytest.mark.timeout(60)


def _linear(family: str, scheme: str, rows: int = 24, cols: int = 40, bias: bool = True) -> Int8Linear:
    gen = torch.Generator().manual_seed(1)
    b = torch.nn.Parameter(torch.randn(rows, generator=gen), requires_grad=False) if bias else None
    layer = Int8Linear(cols, {"q": rows // 2, "k": rows // 2}, family, scheme, b)
    layer.weight.data.copy_(torch.randint(-127, 128, (rows, cols), generator=gen, dtype=torch.int8))
    layer.weight_scale.data.copy_(torch.rand(rows, generator=gen) / 50)
    if scheme == "static":
        layer.input_scale.data.fill_(0.02)
        if family == "msmodelslim":
            layer.input_offset.data.fill_(3.0)
            layer.deq_scale.data.copy_(0.02 * layer.weight_scale.data)
            layer.quant_bias.data.copy_(torch.randint(-500, 500, (rows,), generator=gen, dtype=torch.int32))
    layer.finalize()
    return layer


@pytest.mark.parametrize(
    ("family", "scheme"),
    [
        ("msmodelslim", "static"),
        ("msmodelslim", "dynamic"),
        ("compressed-tensors", "static"),
        ("compressed-tensors", "dynamic"),
    ],
)
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_int8_linear_matches_float64_reference(family: str, scheme: str, rows: int) -> None:
    layer = _linear(family, scheme, bias=not (family == "msmodelslim" and scheme == "static"))
    x = torch.randn(rows, 40, generator=torch.Generator().manual_seed(rows))
    got = layer(x).double().numpy()
    ref = reference_product(x, layer.tensors(), scheme)
    # float32 scales and the float32 cast of the int32 sums: a few ulps of the output's size
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_int_mm_is_exact_integer_product() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (5, 1000), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (1000, 12), generator=gen, dtype=torch.int8)
    assert torch.equal(accelerator.int_mm(a, b), (a.long() @ b.long()).int())


def test_stacked_experts_use_each_experts_scales() -> None:
    experts = Int8StackedExperts(3, 8, 16, {"gate": 0, "up": 4}, "compressed-tensors", "dynamic")
    gen = torch.Generator().manual_seed(2)
    for e in range(3):
        experts.weight_loader(
            experts.weight, torch.randint(-127, 128, (4, 16), generator=gen, dtype=torch.int8), f"{e}:gate"
        )
        experts.weight_loader(
            experts.weight, torch.randint(-127, 128, (4, 16), generator=gen, dtype=torch.int8), f"{e}:up"
        )
        experts.weight_loader(experts.weight_scale, torch.full((4, 1), 0.01 * (e + 1)), f"{e}:gate")
        experts.weight_loader(experts.weight_scale, torch.full((1,), 0.5), f"{e}:up")  # per tensor
    x = torch.randn(5, 16, generator=gen)
    for e in range(3):
        p = {"weight": experts.weight[e], "weight_scale": experts.weight_scale[e]}
        np.testing.assert_allclose(
            experts.product(x, e).double().numpy(), reference_product(x, p, "dynamic"), rtol=1e-5
        )


def test_fused_projections_must_share_a_static_input_scale() -> None:
    layer = Int8Linear(8, {"q": 4, "k": 4}, "compressed-tensors", "static", None)
    layer.weight_loader(layer.input_scale, torch.tensor([0.1]), "q")
    with pytest.raises(ValueError, match="different input_scale"):
        layer.weight_loader(layer.input_scale, torch.tensor([0.2]), "k")


def test_unknown_msmodelslim_type_is_refused_by_name(tmp_path) -> None:
    (tmp_path / int8_formats.DESCRIPTION_FILE).write_text(
        json.dumps(
            {"model_quant_type": "W4A8_DYNAMIC", "model.layers.0.mlp.down_proj.weight": "W4A8_DYNAMIC"}
        )
    )
    with pytest.raises(ValueError, match="'W4A8_DYNAMIC'"):
        int8_formats.checkpoint_scheme(tmp_path, {})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "pack-quantized"}, "format 'pack-quantized'"),
        ({"weights": {"num_bits": 4}}, "num_bits=4"),
        ({"input_activations": {"symmetric": False}}, "symmetric=False"),
        ({"input_activations": {"strategy": "group", "dynamic": False}}, "strategy='group'"),
    ],
)
def test_unsupported_compressed_tensors_schemes_are_refused(change: dict, message: str, tmp_path) -> None:
    from pdmesh.quantize import _ct_config

    quant = _ct_config(static=False)
    group = quant["config_groups"]["group_0"]
    for key, value in change.items():
        if isinstance(value, dict):
            group[key].update(value)
        else:
            quant[key] = value
    with pytest.raises(ValueError, match=message):
        int8_formats.checkpoint_scheme(tmp_path, {"quantization_config": quant})


def test_quantize_cli_answers_bad_input_in_one_line(tmp_path, capsys) -> None:
    from pdmesh.cli import main

    code = main(
        [
            "quantize",
            "--in",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "out"),
            "--format",
            "compressed-tensors",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "has no config.json" in err
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--in", str(tmp_path), "--out", str(tmp_path / "out"), "--format", "w4a16"])
    assert exc.value.code == 2 and "invalid choice: 'w4a16'" in capsys.readouterr().err


@pytest.mark.parametrize(("m", "k", "n"), [(1, 40, 24), (16, 13, 7), (33, 64, 8)])
def test_int_mm_padded_to_cuda_shapes_is_exact(m: int, k: int, n: int) -> None:
    # the padding CUDA's _int_mm needs, checked where it runs (on CPU, here)
    gen = torch.Generator().manual_seed(m)
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).t()  # a weight's transpose
    assert torch.equal(accelerator.padded_int_mm(a, b), (a.long() @ b.long()).int())
