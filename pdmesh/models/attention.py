"""Attention over a paged KV cache (CPU-friendly: PyTorch SDPA on gathered blocks).

The engine fills an ``AttentionMetadata`` per step; every attention layer writes the new tokens'
K/V into its slice of the block pool through the slot mapping, then attends:

- prefill: with the CPU kernels (float32), one kernel call reads every sequence's context from its
  blocks and attends causally; otherwise per sequence, causal SDPA over the new tokens (plus any
  cached prefix read back from the sequence's blocks);
- decode with a ``DecodeWorkspace`` (float32 on CPU, while the batch fits its budget): the batch's
  K/V are kept densely across steps and each step only appends its new tokens (see
  ``decode_workspace``; with the CPU kernels the append and the attention are one call); small
  ones run on one thread;
- other decodes: one new token per sequence. Small batches (gathered K/V up to ``SMALL_DECODE_ELEMENTS``
  values, e.g. batch 1) read each sequence's exact blocks, trim them to its length and attend
  without a mask, on one thread (``single_thread``); larger ones gather the batch's K/V from the
  block tables into a padded ``[B, KVH, S, D]`` tensor and attend with a length mask in one SDPA
  call on the configured threads.

Gathers use ``index_select`` over whole blocks (a row copy per block), which on CPU is tens of times
faster than advanced indexing of the strided per-layer cache view.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdmesh.kernels import cpu as cpu_kernels
from pdmesh.models.decode_workspace import DecodeWorkspace
from pdmesh.models.threads import all_threads, configured_threads, single_thread

# decode batches gathering at most this many K+V values per layer attend per sequence on one thread
SMALL_DECODE_ELEMENTS = 1 << 19


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each sequence attends to."""

    is_prefill: bool
    slot_blocks: torch.Tensor  # [T] block id of each new token's slot
    slot_offsets: torch.Tensor  # [T] offset inside that block
    block_tables: torch.Tensor  # [B, max_blocks] (padded with 0)
    query_lens: list[int]  # prefill: new tokens per sequence
    context_lens: list[int]  # tokens attended per sequence (cached + new)
    decode_mask: torch.Tensor | None = None  # decode: [B, 1, 1, S] True where a slot holds a token
    workspace: DecodeWorkspace | None = None  # decode: the batch's dense K/V kept across steps
    slot_rows: torch.Tensor | None = None  # layer 0's K then V pool rows of the new tokens (lazy)
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None  # prefill: query/context lens (lazy)

    def layer0_slot_rows(self, num_layers: int, block_size: int) -> torch.Tensor:
        """``slot_rows``, worked out once a step: in the pool ``[N, layers, 2, block, KVH, D]``
        seen as rows of one token's K or V, layer 0's rows of the new tokens' K, then of their V
        (layer i's are ``i * 2 * block_size`` further)."""
        if self.slot_rows is None:
            base = (self.slot_blocks * num_layers * 2) * block_size + self.slot_offsets
            self.slot_rows = torch.cat((base, base + block_size))
        return self.slot_rows


class PagedAttention(nn.Module):
    """Writes K/V into the paged cache and attends (grouped-query aware)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.layer_index = 0
        self.kv_cache: torch.Tensor | None = None  # [num_blocks, 2, block_size, KVH, D] pool view
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, KVH, D] views of it
        self.v_cache: torch.Tensor | None = None
        self.pool_rows: torch.Tensor | None = None  # the pool as rows of one token-head set [*, KVH*D]
        self.num_layers = 1

    def bind(self, pool: torch.Tensor, layer_index: int) -> None:
        """Points this layer at its view of the pool ``[num_blocks, layers, 2, block_size, KVH, D]``."""
        self.layer_index, self.num_layers = layer_index, pool.shape[1]
        self.kv_cache = pool[:, layer_index]
        self.k_cache, self.v_cache = self.kv_cache[:, 0], self.kv_cache[:, 1]
        self.pool_rows = pool.view(-1, self.num_kv_heads * self.head_dim)

    def _write_cache(self, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Copies the new tokens' K and V into their slots: one row copy (tens of times faster on
        CPU than assigning through advanced indexing of the strided per-layer view)."""
        block_size = self.kv_cache.shape[2]
        slot_rows = meta.layer0_slot_rows(self.num_layers, block_size)
        offset = self.layer_index * 2 * block_size
        if cpu_kernels.enabled(k) and self.pool_rows.dtype == torch.float32:
            cpu_kernels.store_kv(self.pool_rows, slot_rows, offset, k, v)
            return
        rows = slot_rows + offset
        self.pool_rows.index_copy_(0, rows, torch.cat((k, v)).view(rows.shape[0], -1))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q ``[T, H, D]``, k/v ``[T, KVH, D]`` -> ``[T, H*D]``."""
        self._write_cache(k, v, meta)
        if meta.is_prefill:
            out = self._prefill(q, k, v, meta)
        elif meta.workspace is not None:
            out = self._decode_workspace(q, k, v, meta)
        else:
            out = self._decode(q, meta)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _native(self, q: torch.Tensor) -> bool:
        """Whether attention runs in the CPU kernels (float32 here, and a head layout they take)."""
        return (
            cpu_kernels.enabled(q)
            and self.kv_cache.dtype == torch.float32
            and cpu_kernels.supports_attention(self.num_heads, self.num_kv_heads, self.head_dim)
        )

    def _gather(self, cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
        """One sequence's first ``length`` cached tokens as ``[1, KVH, length, D]``."""
        num_blocks = -(-length // cache.shape[1])
        blocks = cache.index_select(0, block_table[:num_blocks])
        rows = blocks.reshape(-1, self.num_kv_heads, self.head_dim)[:length]
        return rows.transpose(0, 1).unsqueeze(0)

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if self._native(q):
            if meta.lengths is None:  # the first layer builds them for all
                meta.lengths = (torch.tensor(meta.query_lens), torch.tensor(meta.context_lens))
            return cpu_kernels.prefill_attention(
                q.contiguous(),
                self.kv_cache,
                meta.block_tables,
                *meta.lengths,
                self.scale,
                configured_threads(),
            )
        outs = []
        start = 0
        for i, (n, ctx) in enumerate(zip(meta.query_lens, meta.context_lens, strict=True)):
            qi = q[start : start + n].transpose(0, 1).unsqueeze(0)
            if ctx == n:
                ki = k[start : start + n].transpose(0, 1).unsqueeze(0)
                vi = v[start : start + n].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(
                    qi, ki, vi, is_causal=True, scale=self.scale, enable_gqa=True
                )
            else:
                ki = self._gather(self.k_cache, meta.block_tables[i], ctx)
                vi = self._gather(self.v_cache, meta.block_tables[i], ctx)
                q_pos = torch.arange(ctx - n, ctx, device=q.device)
                mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
                o = F.scaled_dot_product_attention(
                    qi, ki, vi, attn_mask=mask, scale=self.scale, enable_gqa=True
                )
            outs.append(o.squeeze(0).transpose(0, 1))
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _decode_workspace(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        ws = meta.workspace
        small = ws.step_kv_elements() <= SMALL_DECODE_ELEMENTS
        # memory-bound work over the whole batch: both cores' bandwidth, unless it is small
        with nullcontext() if small else all_threads():
            if self._native(q):
                threads = torch.get_num_threads()
                return ws.update_and_attend(
                    self.layer_index, self.kv_cache, k, v, q, meta, self.scale, threads
                )
            buf = ws.update(self.layer_index, self.kv_cache, k, v, meta)
            return ws.attend(buf, q, self.scale)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        gathered = 2 * meta.block_tables.numel() * self.k_cache[0].numel()
        if gathered <= SMALL_DECODE_ELEMENTS:
            with single_thread(q.device.type == "cpu"):
                return self._decode_exact(q, meta)
        with all_threads():
            return self._decode_padded(q, meta)

    def _decode_exact(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Per sequence: its own blocks trimmed to its length, SDPA without a mask."""
        outs = []
        for i, ctx in enumerate(meta.context_lens):
            k = self._gather(self.k_cache, meta.block_tables[i], ctx)
            v = self._gather(self.v_cache, meta.block_tables[i], ctx)
            o = F.scaled_dot_product_attention(
                q[i : i + 1].unsqueeze(2), k, v, scale=self.scale, enable_gqa=True
            )
            outs.append(o.squeeze(2))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _decode_padded(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The batch's blocks gathered into a padded ``[B, KVH, S, D]`` and one masked SDPA."""
        b = q.shape[0]
        flat = meta.block_tables.reshape(-1)
        k = self._gather_blocks(self.k_cache, flat, b)
        v = self._gather_blocks(self.v_cache, flat, b)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=meta.decode_mask, scale=self.scale, enable_gqa=True
        )
        return o.squeeze(2)

    def _gather_blocks(self, cache: torch.Tensor, flat_table: torch.Tensor, batch: int) -> torch.Tensor:
        """The blocks of ``flat_table`` (``batch`` equal-width rows) as ``[B, KVH, S, D]``."""
        blocks = cache.index_select(0, flat_table)
        return blocks.view(batch, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
