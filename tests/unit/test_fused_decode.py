"""One kernel call per decoder layer in decode: the same numbers as the per-op path, and its refusals."""

from __future__ import annotations

import random

import pytest
import torch

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.fused_decode import FusedDecoder
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import SamplingParams
from pdmesh.kernels import cpu
from pdmesh.kernels.layer import DecodeLayerWeights, DecodeStepInputs, Norm, decode_layers
from pdmesh.models.layers import RotaryEmbedding
from tests.unit.conftest import NEEDS_AVX2

pytestmark = [pytest.mark.timeout(120), NEEDS_AVX2, pytest.mark.usefixtures("cpu_kernels_built")]

HIDDEN, HEADS, KV_HEADS, DIM, INTER, BLOCK = 32, 4, 2, 8, 48, 4


def _engine(model_dir, fused: bool) -> LLMEngine:
    engine = LLMEngine(
        EngineConfig(model_dir=model_dir, max_num_seqs=8, max_prefill_batch_size=8, max_prefill_tokens=256)
    )
    assert engine.runner.fused is not None, "the fused decoder should apply to this model"
    if not fused:
        engine.runner.fused = None
    return engine


def _recorded_logits(engine: LLMEngine) -> list[torch.Tensor]:
    """Runs a mixed batch (lengths differ, requests finish at different steps, so the workspace
    both appends and rebuilds) and returns every step's logits."""
    run, logits = engine.runner.run, []

    def recording(*args, **kwargs):
        out = run(*args, **kwargs)
        logits.append(out)
        return out

    engine.runner.run = recording
    rng = random.Random(7)
    for i, (length, new) in enumerate([(5, 12), (17, 6), (9, 20), (30, 9)]):
        prompt = [rng.randrange(3, 200) for _ in range(length)]
        engine.add_request(
            EngineRequest(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
        )
    while engine.has_unfinished():
        engine.step()
    return [t for t in logits if t is not None]


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_fused_decode_gives_the_per_op_logits_to_the_bit(model_factory, arch: str) -> None:
    # qwen3: per-head q/k norms; qwen2: biased q/k/v; llama: llama3 rope scaling
    model = model_factory(arch, "tiny")
    engine = _engine(model, True)
    forward, rebuilds = engine.runner.fused.forward, []

    def counting(input_ids, positions, meta):
        rebuilds.append(meta.workspace.rebuild)
        return forward(input_ids, positions, meta)

    engine.runner.fused.forward = counting
    fused, plain = _recorded_logits(engine), _recorded_logits(_engine(model, False))
    assert len(fused) == len(plain) == 20  # a prefill, then the longest request's 19 more tokens
    assert len(rebuilds) == len(fused) - 1  # every step but the prefill ran fused
    assert True in rebuilds and rebuilds.count(False) > 10  # requests leaving rebuild, others append
    for a, b in zip(fused, plain, strict=True):
        assert torch.equal(a, b)


def test_moe_models_and_overridden_forwards_keep_the_module_path(model_factory) -> None:
    engine = LLMEngine(EngineConfig(model_dir=model_factory("qwen3_moe", "tiny")))
    assert engine.runner.fused is None
    model = LLMEngine(EngineConfig(model_dir=model_factory("qwen3", "tiny"))).runner.model
    model.__class__ = type("ScaledEmbeddings", (type(model),), {"forward": lambda self, *args: None})
    assert FusedDecoder.build(model, torch.zeros(4, 2, 2, 4, 2, 16)) is None


def _packed(
    out_features: int, in_features: int, gen: torch.Generator, bias: bool = False
) -> cpu.PackedLinear:
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    return cpu.pack_linear(weight, torch.randn(out_features, generator=gen) if bias else None)


_SHAPES = {
    "qkv": ((HEADS + 2 * KV_HEADS) * DIM, HIDDEN),
    "o": (HIDDEN, HEADS * DIM),
    "gate_up": (2 * INTER, HIDDEN),
    "down": (HIDDEN, INTER),
}


def _layer(gen: torch.Generator, **changes) -> DecodeLayerWeights:
    parts = dict(
        heads=HEADS,
        kv_heads=KV_HEADS,
        head_dim=DIM,
        input_norm=Norm(torch.rand(HIDDEN, generator=gen) + 0.5, 1e-6),
        post_norm=Norm(torch.rand(HIDDEN, generator=gen) + 0.5, 1e-5),
        q_norm=Norm(torch.rand(DIM, generator=gen) + 0.5, 1e-6),
        k_norm=Norm(torch.rand(DIM, generator=gen) + 0.5, 1e-2),  # eps apart: a swap shows
        **{name: _packed(*shape, gen, bias=True) for name, shape in _SHAPES.items()},
    )
    parts.update(changes)
    return DecodeLayerWeights(**parts)


class _Step:
    """A decode step of three sequences over a one-layer pool and its workspace buffer."""

    def __init__(self, gen: torch.Generator) -> None:
        self.lens = torch.tensor([3, 7, 5])
        self.width = 8
        self.pool = torch.zeros(12, 2, BLOCK, KV_HEADS, DIM)  # one layer
        self.buf = torch.randn(2, KV_HEADS, 3, self.width, DIM, generator=gen)
        rope = RotaryEmbedding(DIM, 10000.0, 64, torch.device("cpu"), torch.float32)
        blocks = torch.tensor([2, 5, 9]) + (self.lens - 1) // BLOCK
        base = blocks * 2 * BLOCK + (self.lens - 1) % BLOCK
        self.inputs = DecodeStepInputs(
            positions=self.lens - 1,
            cos=rope.cos,
            sin=rope.sin,
            pool_rows=self.pool.view(-1, KV_HEADS * DIM),
            slot_rows=torch.cat((base, base + BLOCK)),
            lengths=self.lens,
            width=self.width,
        )
        self.h = torch.randn(3, HIDDEN, generator=gen)

    def run(self, layer: DecodeLayerWeights) -> torch.Tensor:
        h = self.h.clone()
        decode_layers([layer], h, self.inputs, lambda i: self.buf, lambda i: 0, 2, 2)
        return h

    def per_op(self, layer: DecodeLayerWeights) -> torch.Tensor:
        """The same layer through the per-op kernels, as pdmesh.models.decoder runs it."""
        input_norm, post_norm, q_norm, k_norm, qkv_w, o_w, gate_up_w, down_w = layer._keep
        h = self.h.clone()
        qkv = cpu.linear(cpu.rms_norm(h, input_norm.weight, input_norm.eps), qkv_w, 2)
        q, k = cpu.qk_norm_rope(
            qkv, HEADS, KV_HEADS, DIM, self.inputs.positions, self.inputs.cos, self.inputs.sin,
            q_norm and (q_norm.weight, q_norm.eps), k_norm and (k_norm.weight, k_norm.eps),
        )  # fmt: skip
        v = qkv[:, (HEADS + KV_HEADS) * DIM :].view(3, KV_HEADS, DIM)
        cpu.store_kv(self.inputs.pool_rows, self.inputs.slot_rows, 0, k, v)
        attn = cpu.decode_attention(self.buf.clone(), k, v, self.lens, q, DIM**-0.5, 2)
        h = h + cpu.linear(attn.view(3, -1), o_w, 2)
        gate_up = cpu.linear(cpu.rms_norm(h, post_norm.weight, post_norm.eps), gate_up_w, 2)
        return h + cpu.linear(cpu.silu_mul(gate_up), down_w, 2)


def test_one_layer_call_equals_the_per_op_kernels_and_stores_the_new_kv() -> None:
    gen = torch.Generator().manual_seed(0)
    layer, step = _layer(gen), _Step(gen)
    expected = step.per_op(layer)
    stored = step.pool.clone()
    step.pool.zero_()
    assert torch.equal(step.run(layer), expected)
    assert torch.equal(step.pool, stored) and stored.abs().sum() > 0
    # the new token's K/V were appended to the workspace at each sequence's last position
    for b, n in enumerate(step.lens.tolist()):
        assert torch.equal(step.buf[0, :, b, n - 1], stored.view(-1, KV_HEADS, DIM)[step.inputs.slot_rows[b]])


def test_a_layer_without_qk_norms_or_biases_matches_too() -> None:
    gen = torch.Generator().manual_seed(1)
    plain = {name: _packed(*shape, gen) for name, shape in _SHAPES.items()}
    layer = _layer(gen, q_norm=None, k_norm=None, **plain)
    step = _Step(gen)
    expected = step.per_op(layer)
    assert torch.equal(step.run(layer), expected)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s.inputs.positions.fill_(64), "outside the rotary table"),
        (lambda s: s.inputs.slot_rows.fill_(10**6), "slot lies outside the KV pool"),
        (lambda s: s.inputs.lengths.fill_(9), "outside 1..the workspace width"),
        (lambda s: s.inputs.lengths.fill_(0), "outside 1..the workspace width"),
    ],
)
def test_indices_outside_their_tables_raise(change, message: str) -> None:
    gen = torch.Generator().manual_seed(2)
    layer, step = _layer(gen), _Step(gen)
    change(step)
    with pytest.raises(ValueError, match=message):
        step.run(layer)


def test_bad_layouts_are_refused_before_any_pointer_reaches_c() -> None:
    gen = torch.Generator().manual_seed(3)
    with pytest.raises(ValueError, match="o is 40->32, not 32->32"):
        _layer(gen, o=_packed(HIDDEN, HIDDEN + 8, gen))
    with pytest.raises(ValueError, match="input_norm is not"):
        _layer(gen, input_norm=Norm(torch.ones(HIDDEN + 1), 1e-6))
    with pytest.raises(ValueError, match="unsupported head layout"):
        _layer(gen, heads=3)
    truncated = _packed(HIDDEN, INTER, gen)
    with pytest.raises(ValueError, match="not a weight packed by pack_linear"):
        _layer(gen, down=cpu.PackedLinear(truncated.weight[:-1], None, INTER, HIDDEN))
    layer, step = _layer(gen), _Step(gen)
    with pytest.raises(ValueError, match="workspace is not"):
        decode_layers(
            [layer], step.h.clone(), step.inputs, lambda i: step.buf[:, :, :2].contiguous(), lambda i: 0, 1, 1
        )
    with pytest.raises(ValueError, match="h must be"):
        decode_layers(
            [layer], step.h[:, :16].contiguous(), step.inputs, lambda i: step.buf, lambda i: 0, 1, 1
        )
    step.inputs.positions = step.inputs.positions.int()
    with pytest.raises(ValueError, match="positions must be"):
        step.run(layer)
