"""What every causal LM tells the engine about its paged KV cache.

The engine allocates one pool ``[num_blocks, *model.kv_block_shape(block_size)]`` and describes it
with ``model.kv_kind`` and ``model.kv_heads_and_dim()``; the model's ``bind_kv_cache`` then takes
its per-layer views of that pool. Standard attention (MHA/GQA) keeps separate K and V per layer;
a model with another cache (e.g. DeepSeek's latent MLA cache) overrides these. ``StackedCausalLM``
adds the forward pass, logits and weight tying that every family shares.
"""

from __future__ import annotations

import torch


class KVCacheMixin:
    """Default (MHA/GQA) KV cache description: ``[layers, 2 (K, V), block_size, kv_heads, head_dim]``.

    Mixed into a model class that has ``self.config`` (a ``ModelConfig``).
    """

    kv_kind: str = "mha"  # the ``KVLayout.kind``: "mha" or "mla"
    rope_types: tuple[str, ...] = ("default",)  # rope scaling types the model implements

    def kv_block_shape(self, block_size: int) -> tuple[int, ...]:
        """Shape of one KV block of ``block_size`` tokens (all layers)."""
        cfg = self.config
        return (cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim)

    def kv_heads_and_dim(self) -> tuple[int, int]:
        """``(num_kv_heads, head_dim)`` of one cached token in one layer, for the ``KVLayout``."""
        return self.config.num_kv_heads, self.config.head_dim


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

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
