"""A dense decoder layer's decode step as one kernel call (``csrc/decode_layer.c``).

``DecodeLayerWeights`` checks a layer's weights once (norms, packed products, head layout) and
keeps them, with the C struct that points at them (mirrored in ``abi``), alive together; ``decode_layers`` runs a decode
step's layers over the residual stream ``h`` in place, after checking the step's tensors, and
reports a position, slot or length outside its table as ``ValueError`` (the kernels check them
where they read them). The result equals, to the bit, the per-op kernel path of
``pdmesh.models.decoder`` over the decode workspace.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdmesh.kernels import cpu
from pdmesh.kernels.abi import LayerStruct, StepStruct
from pdmesh.kernels.cpu import PackedLinear, _f32_contiguous, _lib, _ptr, _require

_ERRORS = {
    1: "a position lies outside the rotary table",
    2: "a new token's slot lies outside the KV pool",
    3: "a context length lies outside 1..the workspace width (or attention scratch ran out)",
}


@dataclass
class Norm:
    """An RMSNorm's weight and eps."""

    weight: torch.Tensor
    eps: float


class DecodeLayerWeights:
    """One dense pre-norm layer (GQA attention with fused q/k/v, SwiGLU MLP) for ``decode_layers``."""

    def __init__(
        self,
        *,
        heads: int,
        kv_heads: int,
        head_dim: int,
        input_norm: Norm,
        post_norm: Norm,
        q_norm: Norm | None,
        k_norm: Norm | None,
        qkv: PackedLinear,
        o: PackedLinear,
        gate_up: PackedLinear,
        down: PackedLinear,
    ) -> None:
        hidden, inter = qkv.in_features, down.in_features
        _require(cpu.supports_attention(heads, kv_heads, head_dim), "decode layer: unsupported head layout")
        _require(
            cpu.supports_rope(head_dim), f"decode layer: head_dim {head_dim} unsupported by the rope kernel"
        )
        shapes = {
            "qkv": (qkv, hidden, (heads + 2 * kv_heads) * head_dim),
            "o": (o, heads * head_dim, hidden),
            "gate_up": (gate_up, hidden, 2 * inter),
            "down": (down, inter, hidden),
        }
        for name, (packed, fan_in, fan_out) in shapes.items():
            _require(
                (packed.in_features, packed.out_features) == (fan_in, fan_out),
                f"decode layer: {name} is {packed.in_features}->{packed.out_features}, not {fan_in}->{fan_out}",
            )
            _check_packed(name, packed)
        for name, norm, size in (
            ("input_norm", input_norm, hidden),
            ("post_norm", post_norm, hidden),
            ("q_norm", q_norm, head_dim),
            ("k_norm", k_norm, head_dim),
        ):
            if norm is not None:
                _f32_contiguous(f"decode layer {name}", norm.weight)
                _require(norm.weight.numel() == size, f"decode layer: {name} is not [{size}]")
        self.shape = (hidden, heads, kv_heads, head_dim, inter)
        self._keep = (input_norm, post_norm, q_norm, k_norm, qkv, o, gate_up, down)
        self.struct = LayerStruct(
            hidden, heads, kv_heads, head_dim, inter,
            input_norm.weight.data_ptr(), post_norm.weight.data_ptr(), input_norm.eps, post_norm.eps,
            _ptr(q_norm.weight) if q_norm else None, _ptr(k_norm.weight) if k_norm else None,
            q_norm.eps if q_norm else 0.0, k_norm.eps if k_norm else 0.0,
            qkv.weight_ptr, qkv.bias_ptr, o.weight_ptr, o.bias_ptr,
            gate_up.weight_ptr, gate_up.bias_ptr, down.weight_ptr, down.bias_ptr,
            head_dim**-0.5,
        )  # fmt: skip


def _check_packed(name: str, packed: PackedLinear) -> None:
    """The packed weight (and bias) hold what ``pack_linear`` writes for their features."""
    panels = -(-packed.out_features // cpu.LINEAR_PANEL)
    _f32_contiguous(f"decode layer {name} weight", packed.weight)
    _require(
        packed.weight.numel() == panels * packed.in_features * cpu.LINEAR_PANEL
        and packed.weight.data_ptr() % 32 == 0,
        f"decode layer: {name} is not a weight packed by pack_linear",
    )
    if packed.bias is not None:
        _f32_contiguous(f"decode layer {name} bias", packed.bias)
        _require(
            packed.bias.numel() == panels * cpu.LINEAR_PANEL, f"decode layer: {name}'s bias is not padded"
        )


@dataclass
class DecodeStepInputs:
    """What a decode step's layers share: positions ``[B]``, the rope tables ``[P, D]``, the KV pool
    as rows of ``KVH * D`` floats, layer 0's slot rows of the new K then V ``[2B]``, the context
    lengths ``[B]`` and the workspace width."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    pool_rows: torch.Tensor
    slot_rows: torch.Tensor
    lengths: torch.Tensor
    width: int


def _check_step(layer: DecodeLayerWeights, h: torch.Tensor, step: DecodeStepInputs) -> None:
    hidden, _, kv_heads, head_dim, _ = layer.shape
    _f32_contiguous("decode step h", h)
    _require(h.dim() == 2 and h.shape[1] == hidden, f"decode step: h must be [B, {hidden}]")
    batch = h.shape[0]
    for name, t, numel in (
        ("positions", step.positions, batch),
        ("slot_rows", step.slot_rows, 2 * batch),
        ("lengths", step.lengths, batch),
    ):
        _require(
            t.dtype == torch.int64 and t.device.type == "cpu" and t.is_contiguous() and t.numel() == numel,
            f"decode step: {name} must be {numel} contiguous int64 values",
        )
    for name, t in (("cos", step.cos), ("sin", step.sin), ("pool_rows", step.pool_rows)):
        _f32_contiguous(f"decode step {name}", t)
    _require(
        step.cos.dim() == 2 and step.cos.shape == step.sin.shape and step.cos.shape[1] == head_dim,
        "decode step: cos/sin must be [P, head_dim]",
    )
    _require(
        step.pool_rows.dim() == 2 and step.pool_rows.shape[1] == kv_heads * head_dim,
        "decode step: the pool must be rows of one token's K or V",
    )


def decode_layers(
    layers: list[DecodeLayerWeights],
    h: torch.Tensor,
    step: DecodeStepInputs,
    layer_buffer: Callable[[int], torch.Tensor],
    pool_offset: Callable[[int], int],
    threads: int,
    attention_threads: int,
) -> None:
    """Runs ``layers`` over the residual stream ``h`` ``[B, hidden]`` in place for one decode step.

    ``layer_buffer(i)`` is layer i's decode workspace ``[2, KVH, B, width, D]`` (holding the cached
    tokens), ``pool_offset(i)`` its pool rows' offset from layer 0's.
    """
    _require(bool(layers), "decode step: no layers")
    _check_step(layers[0], h, step)
    hidden, heads, kv_heads, head_dim, inter = layers[0].shape
    batch = h.shape[0]
    lib = _lib()
    floats = lib.pdm_decode_scratch_floats(batch, hidden, heads, kv_heads, head_dim, inter)
    scratch = torch.empty(floats, dtype=torch.float32)  # not the default dtype: C writes float32
    args = StepStruct(
        batch, step.positions.data_ptr(), step.cos.data_ptr(), step.sin.data_ptr(), step.cos.shape[0],
        step.pool_rows.data_ptr(), step.pool_rows.shape[0], step.slot_rows.data_ptr(), step.lengths.data_ptr(),
        step.width, scratch.data_ptr(), threads, attention_threads,
    )  # fmt: skip
    expected = (2, kv_heads, batch, step.width, head_dim)
    for i, layer in enumerate(layers):
        _require(layer.shape == layers[0].shape, "decode step: the layers differ in shape")
        buf = layer_buffer(i)
        _f32_contiguous("decode step workspace", buf)
        _require(tuple(buf.shape) == expected, f"decode step: layer {i}'s workspace is not {list(expected)}")
        failed = lib.pdm_decode_layer(
            ctypes.byref(layer.struct), ctypes.byref(args), pool_offset(i), buf.data_ptr(), h.data_ptr()
        )
        if failed:
            raise ValueError(f"decode step, layer {i}: {_ERRORS.get(failed, f'error {failed}')}")
