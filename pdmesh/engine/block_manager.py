"""Paged KV block bookkeeping: refcounts, a free list, ask/do pairs, and prefix caching.

Every ``allocate``/``append_slot`` has a ``can_*`` question to ask first; the scheduler asks, then
does. Prefix caching: a full block is named by a hash chained over the tokens of all blocks up to
it; a new prompt whose leading full blocks match reuses them (refcount + 1) instead of recomputing.
A freed block keeps its name until it is handed out again, least recently freed first.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

log = logging.getLogger(__name__)


def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    """The name of a full block: its tokens and the name of the block before it."""
    return hash((prev, tokens))


class BlockManager:
    """Owns the ids ``0..num_blocks-1`` of the KV pool's blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refs = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_of: list[int | None] = [None] * num_blocks
        self._tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    # -- fresh blocks -----------------------------------------------------------------------------

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        name = self._hash_of[block]
        if name is not None:  # evict its cached name
            if self._by_hash.get(name) == block:
                del self._by_hash[name]
            self._hash_of[block] = self._tokens_of[block] = None
        self._refs[block] = 1
        return block

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> list[int]:
        """Fresh (uncached) blocks for ``num_tokens`` tokens; ask ``can_allocate`` first."""
        n = self.blocks_for(num_tokens)
        if n > len(self._free):
            raise RuntimeError(f"allocate({num_tokens}) needs {n} blocks but {len(self._free)} are free")
        return [self._take_free() for _ in range(n)]

    # -- prompts, with prefix caching ------------------------------------------------------------

    def _match(self, token_ids: list[int]) -> list[int]:
        """Cached blocks holding the leading full blocks of ``token_ids`` (always leaves one token)."""
        if not self.enable_prefix_caching:
            return []
        hits, prev, bs = [], None, self.block_size
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            prev = chain_hash(prev, tokens)
            block = self._by_hash.get(prev)
            if block is None or self._tokens_of[block] != tokens:
                break
            hits.append(block)
        return hits

    def cached_prefix_blocks(self, token_ids: list[int]) -> int:
        """How many leading full blocks of ``token_ids`` the prefix cache holds (nothing changes)."""
        return len(self._match(token_ids))

    def can_allocate_prompt(self, token_ids: list[int]) -> bool:
        hits = self._match(token_ids)
        revived = sum(1 for b in hits if self._refs[b] == 0)
        return self.blocks_for(len(token_ids)) - len(hits) + revived <= len(self._free)

    def allocate_prompt(self, token_ids: list[int]) -> tuple[list[int], int]:
        """Blocks for ``token_ids`` reusing cached leading blocks; returns (blocks, cached tokens)."""
        if not self.can_allocate_prompt(token_ids):
            raise RuntimeError(f"allocate_prompt of {len(token_ids)} tokens: not enough free blocks")
        hits = self._match(token_ids)
        for b in hits:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1
        fresh = [self._take_free() for _ in range(self.blocks_for(len(token_ids)) - len(hits))]
        cached = len(hits) * self.block_size
        self.prefix_query_tokens += len(token_ids)
        self.prefix_hit_tokens += cached
        return hits + fresh, cached

    def cache_full_blocks(self, block_table: list[int], token_ids: list[int], hashes: list[int]) -> None:
        """Names the full blocks of ``token_ids`` not yet in ``hashes`` (extended in place)."""
        bs = self.block_size
        while len(hashes) < len(token_ids) // bs:
            i = len(hashes)
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            name = chain_hash(hashes[-1] if hashes else None, tokens)
            hashes.append(name)
            block = block_table[i]
            if self.enable_prefix_caching and self._hash_of[block] is None and name not in self._by_hash:
                self._by_hash[name] = block
                self._hash_of[block], self._tokens_of[block] = name, tokens

    # -- growth and release -----------------------------------------------------------------------

    def can_append(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether a sequence can grow to ``num_tokens`` tokens."""
        return self.blocks_for(num_tokens) - len(block_table) <= len(self._free)

    def append_slot(self, block_table: list[int], num_tokens: int) -> None:
        """Grows ``block_table`` in place until it holds ``num_tokens`` tokens."""
        while len(block_table) < self.blocks_for(num_tokens):
            if not self._free:
                raise RuntimeError("append_slot with no free block; ask can_append first")
            block_table.append(self._take_free())

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
        """Drops one reference per block; a block with none left goes back to the free list.

        Blocks go back last first, so a freed sequence's tail is evicted before its prefix.
        """
        for i in reversed(block_ids):
            if not self.is_allocated(i):
                raise ValueError(f"block {i} is not allocated (double free?)")
            self._refs[i] -= 1
            if self._refs[i] == 0:
                self._free[i] = None
