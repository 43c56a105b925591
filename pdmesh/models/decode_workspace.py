"""A dense copy of the running decode batch's K/V, kept across steps so decode need not re-gather.

Paged attention on CPU has no kernel that reads K/V where they lie in the block pool: each decode
step copied every cached token of the batch out of its blocks (``index_select``) and then attended
over the copy, so at batch 32 and ~200 tokens of context the copy and the masked SDPA took about
as long as all the layer projections together. Between two decode steps of the same batch,
though, only one token per sequence changes. The workspace therefore keeps, per layer, the batch's
K and V in an attention-friendly dense layout ``[2, kv_heads, batch, width, head_dim]``:

- a step whose batch is the previous decode step's batch (the same sequences, in the same order,
  each exactly one token longer, and no other step in between) appends the new token's K/V; a
  sequence is named by a key that never names another while it lives (the engine's admission
  number, which also travels to the other ranks of a tensor-parallel replica);
- any other step rebuilds it: the blocks are gathered once and laid out densely (the old cost);
- a step that fails midway leaves it invalid, and the next step rebuilds.

Attention is then two batched products over ``kv_heads * batch`` small matrices and a softmax,
with a ``-inf`` bias past each sequence's length. The workspace is only used while it fits in
``budget_bytes``; beyond, attention falls back to gathering every step.
"""

from __future__ import annotations

from typing import Any

import torch

from pdmesh.kernels import cpu as cpu_kernels

# width granularity: growing the width by this many tokens costs one rebuild
WIDTH_STEP = 64


class DecodeWorkspace:
    """Per-layer dense K/V of the current decode batch, and the step's length bias."""

    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, budget_bytes: int
    ) -> None:
        self.num_layers = num_layers
        # widths are whole blocks (a rebuild copies whole blocks), about WIDTH_STEP tokens at a time
        self.width_step = block_size * max(1, WIDTH_STEP // block_size)
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.budget_bytes = budget_bytes
        self._buffers: list[torch.Tensor | None] = [None] * num_layers
        self._batch: list[Any] = []  # the sequence keys of the last committed decode step
        self._lens: list[int] = []
        self._width = 0
        self._valid = False
        # per step
        self.rebuild = True
        self.length = 0  # S: the longest context of the step
        self.lengths: torch.Tensor | None = None  # [B] int64: each sequence's context this step
        self._bias: torch.Tensor | None = None  # attend()'s length bias for this step (lazy)
        self._rows: torch.Tensor | None = None  # where the step's new tokens go (lazy)

    @property
    def width(self) -> int:
        """Positions per sequence in this step's buffers."""
        return self._width

    def step_kv_elements(self) -> int:
        """K and V values this step's attention reads per layer (the batch at its longest context)."""
        return 2 * len(self._batch) * self.length * self.num_kv_heads * self.head_dim

    def invalidate(self) -> None:
        """Forgets the batch: the next decode step rebuilds (after a prefill or a failed step)."""
        self._valid = False

    def begin(
        self, seqs: list[Any], context_lens: list[int], device: torch.device, dtype: torch.dtype
    ) -> bool:
        """Prepares a decode step of ``seqs`` (their keys); False when the batch does not fit the budget."""
        longest = max(context_lens)
        width = max(self._width, -(-longest // self.width_step) * self.width_step)
        per_layer = 2 * self.num_kv_heads * len(seqs) * width * self.head_dim
        if per_layer * self.num_layers * dtype.itemsize > self.budget_bytes:
            self.release()
            return False
        same_batch = (
            self._valid
            and width == self._width
            and len(seqs) == len(self._batch)
            and all(a == b for a, b in zip(seqs, self._batch, strict=True))
            and all(n == m + 1 for n, m in zip(context_lens, self._lens, strict=True))
        )
        self.rebuild = not same_batch
        self._valid = False  # until commit(): a failure midway leaves layers half-updated
        self._batch, self._lens, self._width, self.length = list(seqs), list(context_lens), width, longest
        self.lengths = torch.tensor(context_lens, device=device)
        self._bias = self._rows = None
        return True

    def commit(self) -> None:
        """The step ran through every layer: the next step of the same batch may append."""
        self._valid = True

    def release(self) -> None:
        """Drops the buffers (the batch no longer fits the budget, or the engine is idle)."""
        self._buffers = [None] * self.num_layers
        self._valid = False
        self._width = 0

    def _length_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """``[KVH * B, 1, S]``: 0 where a token is, -inf past each sequence's length (built once a
        step, by the first layer that attends in PyTorch; the CPU kernel reads ``lengths``)."""
        if self._bias is None:
            lengths, longest = self.lengths, self.length
            past_end = torch.arange(longest, device=lengths.device)[None, :] >= lengths[:, None]
            bias = torch.zeros(past_end.shape, device=lengths.device, dtype=dtype)
            bias.masked_fill_(past_end, float("-inf"))
            batch = lengths.numel()
            self._bias = bias.expand(self.num_kv_heads, batch, longest).reshape(
                self.num_kv_heads * batch, 1, longest
            )
        return self._bias

    def _buffer(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s ``[2, KVH, B, width, D]`` view of its (grown when needed) storage."""
        shape = (2, self.num_kv_heads, len(self._batch), self._width, self.head_dim)
        numel = torch.Size(shape).numel()
        flat = self._buffers[layer]
        if flat is None or flat.numel() < numel or flat.dtype != like.dtype:
            flat = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[layer] = flat
        return flat[:numel].view(shape)

    def update(
        self, layer: int, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Any
    ) -> torch.Tensor:
        """Brings layer ``layer``'s K/V up to this step; returns its ``[2, KVH, B, width, D]`` buffer.

        ``kv_cache`` is the layer's ``[blocks, 2, block_size, KVH, D]`` pool view (already holding
        this step's tokens), ``k``/``v`` this step's ``[B, KVH, D]``.
        """
        buf = self._buffer(layer, k)
        if self.rebuild:
            self._gather(buf, kv_cache, meta.block_tables)
        else:
            rows = self._append_rows(k.device)
            new = torch.stack((k, v)).transpose(1, 2).reshape(rows.shape[0], self.head_dim)
            buf.view(-1, self.head_dim).index_copy_(0, rows, new)
        return buf

    def update_and_attend(
        self,
        layer: int,
        kv_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q: torch.Tensor,
        meta: Any,
        scale: float,
        threads: int,
    ) -> torch.Tensor:
        """``update`` and ``attend`` as one CPU kernel (float32 on a CPU where it built): the append
        and the attention in one pass over each sequence's K and V. Returns ``[B, H, D]``."""
        buf = self.layer_buffer(layer, kv_cache, meta.block_tables)
        return cpu_kernels.decode_attention(buf, k, v, self.lengths, q.contiguous(), scale, threads)

    def layer_buffer(self, layer: int, kv_cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s buffer for an attention kernel that appends the step's K/V itself: on a
        rebuild, first filled from the pool (the append then writes what the gather copied, or the
        token the pool does not hold yet)."""
        buf = self._buffer(layer, kv_cache)
        if self.rebuild:
            self._gather(buf, kv_cache, block_tables)
        return buf

    def _append_rows(self, device: torch.device) -> torch.Tensor:
        """Rows of ``buf.view(-1, D)`` the step's new tokens go to, ordered (K/V, head, sequence)."""
        if self._rows is None:
            batch = len(self._lens)
            positions = torch.tensor(self._lens, device=device) - 1
            first = torch.arange(2 * self.num_kv_heads * batch, device=device) * self._width
            self._rows = first + positions.repeat(2 * self.num_kv_heads)
        return self._rows

    def _gather(self, buf: torch.Tensor, kv_cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        batch, blocks_per_seq = tables.shape
        block_size = kv_cache.shape[2]
        blocks = kv_cache.index_select(0, tables.reshape(-1))  # [B * nb, 2, bs, KVH, D]
        blocks = blocks.view(batch, blocks_per_seq, 2, block_size, self.num_kv_heads, self.head_dim)
        span = blocks_per_seq * block_size
        target = buf[:, :, :, :span].unflatten(3, (blocks_per_seq, block_size))
        target.copy_(blocks.permute(2, 4, 0, 1, 3, 5))  # -> [2, KVH, B, nb, bs, D]
        # slots past a sequence's length are masked, but probability 0 times a NaN or inf left in
        # the memory is still NaN: the slots that appends will not reach before them hold zeros
        buf[:, :, :, span:].zero_()
        return buf

    def attend(self, buf: torch.Tensor, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of ``q`` ``[B, H, D]`` over the buffer; returns ``[B, H, D]``."""
        batch, heads, dim = q.shape
        kvh = self.num_kv_heads
        group = heads // kvh
        keys = buf[0].reshape(kvh * batch, self._width, dim)[:, : self.length]
        values = buf[1].reshape(kvh * batch, self._width, dim)[:, : self.length]
        queries = q.view(batch, kvh, group, dim).transpose(0, 1).reshape(kvh * batch, group, dim)
        scores = torch.baddbmm(self._length_bias(q.dtype), queries, keys.transpose(1, 2), alpha=scale)
        out = torch.bmm(torch.softmax(scores, dim=-1), values)
        return out.view(kvh, batch, group, dim).transpose(0, 1).reshape(batch, heads, dim)
