"""What every causal LM tells the engine about its paged KV cache.

The engine allocates one pool ``[num_blocks, *model.kv_block_shape(block_size)]`` and describes it
with ``model.kv_kind`` and ``model.kv_heads_and_dim()``; the model's ``bind_kv_cache`` then takes
its per-layer views of that pool. Standard attention (MHA/GQA) keeps separate K and V per layer;
a model with another cache (e.g. DeepSeek's latent MLA cache) overrides these. ``StackedCausalLM``
adds the forward pass, logits and weight tying that every family shares.
"""

from __future__ import annotations

import torch

from pdmesh.parallel.layout import kv_head_range
from pdmesh.parallel.state import current


class KVCacheMixin:
    """Default (MHA/GQA) KV cache description: ``[layers, 2 (K, V), block_size, kv_heads, head_dim]``.

    Mixed into a model class that has ``self.config`` (a ``ModelConfig``).
    """

    kv_kind: str = "mha"  # the ``KVLayout.kind``: "mha" or "mla"
    rope_types: tuple[str, ...] = ("default",)  # rope scaling types the model implements

    def local_kv_heads(self) -> int:
        """The KV heads this rank caches: all of them unsharded, its tp slice under tensor parallelism."""
        state = current()
        return kv_head_range(self.config.num_kv_heads, state.tp, state.tp_rank)[1]

    def kv_block_shape(self, block_size: int) -> tuple[int, ...]:
        """Shape of one KV block of ``block_size`` tokens (all layers) in this rank's pool."""
        cfg = self.config
        return (cfg.num_layers, 2, block_size, self.local_kv_heads(), cfg.head_dim)

    def kv_heads_and_dim(self) -> tuple[int, int]:
        """``(kv_heads, head_dim)`` of one cached token in one layer of this rank's pool, for the ``KVLayout``."""
        return self.local_kv_heads(), self.config.head_dim


class StackedCausalLM(KVCacheMixin):
    """What every family's causal LM computes the same way, mixed into an ``nn.Module`` that has
    ``self.model`` (``embed_tokens``, ``layers`` called as ``layer(h, positions, rope, meta)``,
    ``norm``), ``self.lm_head`` and ``self.rope``: ``forward`` returns hidden states and
    ``compute_logits`` projects the chosen rows."""

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, positions, self.rope, meta)
        return self.model.norm(h)

    @torch.inference_mode()
    def join_idle(self) -> None:
        """A dp replica with no tokens this step: every MoE layer's collectives, with an empty batch,
        so that the replicas that do run never wait for this one (dense layers only talk within
        the replica, which is idle as a whole)."""
        weight = next(self.parameters())
        empty = torch.empty((0, self.config.hidden_size), dtype=weight.dtype, device=weight.device)
        for layer in self.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp(empty)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the chosen rows: the whole vocabulary, or this rank's slice of it under tp."""
        return self.lm_head(hidden)
