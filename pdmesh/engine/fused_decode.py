"""A CPU decode step of a dense decoder model with one kernel call per layer.

With the CPU kernels, a float32 decode step over the decode workspace still went through ~75
Python-level calls (module dispatch, argument checks, ctypes) of 10-50 microseconds each.
``FusedDecoder`` runs the same kernels, in the same order, from one C call per layer
(``pdmesh.kernels.layer``): the hidden states are equal to the bit, only the Python around them is
gone (a batch-32 step of the bench model: 34.2 ms against 37.0, medians of the two paths
alternating in one process).

It applies to the standard decoder (``DecoderForCausalLM``: Llama, Qwen2, Qwen3) with dense SwiGLU
MLPs whose products were packed for the kernel, on decode steps that use the workspace; every
other step (prefill, decode beyond the workspace budget), every other model (MoE, MLA) and every
model sharded over tensor parallelism (the layer call has no place for its all-reduces) keeps the
module path.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pdmesh.kernels import cpu as cpu_kernels
from pdmesh.kernels.layer import DecodeLayerWeights, DecodeStepInputs, Norm, decode_layers
from pdmesh.models import AttentionMetadata
from pdmesh.models.attention import SMALL_DECODE_ELEMENTS
from pdmesh.models.base import StackedCausalLM
from pdmesh.models.decoder import DecoderForCausalLM, DecoderLayer, GQAttention
from pdmesh.models.layers import GatedMLP, RMSNorm
from pdmesh.models.threads import configured_threads
from pdmesh.parallel.state import current

log = logging.getLogger(__name__)


def _norm(module: RMSNorm | None) -> Norm | None:
    return None if module is None else Norm(module.weight.detach(), module.eps)


def _layer_weights(layer: nn.Module) -> DecodeLayerWeights | None:
    """The layer's weights when it is exactly the standard dense layer (a subclass may compute
    something else), else None."""
    if type(layer) is not DecoderLayer:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    if type(attn) is not GQAttention or type(mlp) is not GatedMLP:
        return None
    norms = (layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm)
    if any(norm is not None and type(norm) is not RMSNorm for norm in norms):
        return None
    packed = [
        getattr(m, "packed_linear", None)
        for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    ]
    if any(p is None for p in packed):
        return None
    if not (
        cpu_kernels.supports_rope(attn.hd) and cpu_kernels.supports_attention(attn.nh, attn.nkv, attn.hd)
    ):
        return None
    qkv, o, gate_up, down = packed
    return DecodeLayerWeights(
        heads=attn.nh,
        kv_heads=attn.nkv,
        head_dim=attn.hd,
        input_norm=_norm(layer.input_layernorm),
        post_norm=_norm(layer.post_attention_layernorm),
        q_norm=_norm(attn.q_norm),
        k_norm=_norm(attn.k_norm),
        qkv=qkv,
        o=o,
        gate_up=gate_up,
        down=down,
    )


class FusedDecoder:
    """Runs a dense decoder model's workspace decode steps one kernel call per layer."""

    def __init__(
        self, model: DecoderForCausalLM, layers: list[DecodeLayerWeights], pool: torch.Tensor
    ) -> None:
        self.model = model
        self.layers = layers
        self.pool_rows = pool.view(-1, model.config.num_kv_heads * model.config.head_dim)
        self.num_layers, self.block_size = pool.shape[1], pool.shape[3]
        self.caches = [layer.self_attn.attn.kv_cache for layer in model.model.layers]

    @classmethod
    def build(cls, model: nn.Module, pool: torch.Tensor) -> FusedDecoder | None:
        """The fused decoder for ``model`` over the KV ``pool``, or None where it does not apply."""
        standard = (
            isinstance(model, DecoderForCausalLM)
            and type(model).forward is StackedCausalLM.forward
            and type(model.model.norm) is RMSNorm
            and model.rope is not None
        )
        if not standard or not (cpu_kernels.enabled(pool) and cpu_kernels.enabled(model.rope.cos)):
            return None
        if current().tp > 1:  # a layer call has no place for the all-reduces of sharded layers
            log.info("decode steps keep the module path: layers are sharded over tp=%d", current().tp)
            return None
        try:
            layers = [_layer_weights(layer) for layer in model.model.layers]
        except ValueError as exc:  # a layout the kernel refuses: the module path still serves it
            log.warning("decode steps keep the module path: %s", exc)
            return None
        if not layers or any(w is None for w in layers):
            return None
        log.info("decode steps run one kernel call per layer (%d layers)", len(layers))
        return cls(model, layers, pool)

    @staticmethod
    def applies(meta: AttentionMetadata) -> bool:
        """Whether this step is one the fused path runs (a decode over the workspace)."""
        return not meta.is_prefill and meta.workspace is not None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The final-normed hidden states ``[B, hidden]``, as ``model(input_ids, positions, meta)``."""
        decoder = self.model.model
        h = decoder.embed_tokens(input_ids).contiguous()
        workspace = meta.workspace
        step = DecodeStepInputs(
            positions=positions.contiguous(),
            cos=self.model.rope.cos,
            sin=self.model.rope.sin,
            pool_rows=self.pool_rows,
            slot_rows=meta.layer0_slot_rows(self.num_layers, self.block_size),
            lengths=workspace.lengths,
            width=workspace.width,
        )
        small = workspace.step_kv_elements() <= SMALL_DECODE_ELEMENTS  # as the module path decides
        threads = configured_threads()
        decode_layers(
            self.layers,
            h,
            step,
            lambda i: workspace.layer_buffer(i, self.caches[i], meta.block_tables),
            lambda i: i * 2 * self.block_size,
            threads,
            1 if small else threads,
        )
        return decoder.norm(h)
