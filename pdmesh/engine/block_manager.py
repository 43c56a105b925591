"""Paged KV block bookkeeping: a free list and reference counts, with ask/do pairs.

Every ``allocate``/``append_slot`` has a ``can_*`` question to ask first; the scheduler asks, then
does. Blocks are refcounted so that a block may later be shared (prefix caching, pinning).
"""

from __future__ import annotations

import logging
from collections import deque

log = logging.getLogger(__name__)


class BlockManager:
    """Owns the ids ``0..num_blocks-1`` of the KV pool's blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> list[int]:
        """Fresh blocks for ``num_tokens`` tokens; ask ``can_allocate`` first."""
        n = self.blocks_for(num_tokens)
        if n > len(self._free):
            raise RuntimeError(f"allocate({num_tokens}) needs {n} blocks but {len(self._free)} are free")
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self._refs[i] = 1
        return ids

    def can_append(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether a sequence can grow to ``num_tokens`` tokens (at most one new block)."""
        return self.blocks_for(num_tokens) - len(block_table) <= len(self._free)

    def append_slot(self, block_table: list[int], num_tokens: int) -> None:
        """Grows ``block_table`` in place until it holds ``num_tokens`` tokens."""
        while len(block_table) < self.blocks_for(num_tokens):
            if not self._free:
                raise RuntimeError("append_slot with no free block; ask can_append first")
            block = self._free.popleft()
            self._refs[block] = 1
            block_table.append(block)

    may_append = append_slot

    def is_allocated(self, block_id: int) -> bool:
        return 0 <= block_id < self.num_blocks and self._refs[block_id] > 0

    def fork(self, block_ids: list[int]) -> None:
        """Adds a reference to each block (shared by another owner)."""
        for i in block_ids:
            if not self.is_allocated(i):
                raise ValueError(f"block {i} is not allocated")
            self._refs[i] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drops one reference per block; a block with none left goes back to the free list."""
        for i in block_ids:
            if not self.is_allocated(i):
                raise ValueError(f"block {i} is not allocated (double free?)")
            self._refs[i] -= 1
            if self._refs[i] == 0:
                self._free.append(i)
