"""Block manager: ask/do pairs, refcounts, double frees."""

from __future__ import annotations

import pytest

from pdmesh.engine.block_manager import BlockManager

pytestmark = pytest.mark.timeout(10)


def test_allocate_and_free_round_trip() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.blocks_for(1) == 1 and bm.blocks_for(4) == 1 and bm.blocks_for(5) == 2
    assert bm.can_allocate(32) and not bm.can_allocate(33)
    ids = bm.allocate(9)
    assert len(ids) == 3 and len(set(ids)) == 3
    assert bm.num_free_blocks == 5
    bm.free(ids)
    assert bm.num_free_blocks == 8


def test_allocate_beyond_free_raises() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(RuntimeError):
        bm.allocate(9)


def test_append_slot_grows_only_at_block_boundaries() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    table = bm.allocate(4)
    assert bm.can_append(table, 4)
    bm.append_slot(table, 4)
    assert len(table) == 1
    bm.append_slot(table, 5)
    assert len(table) == 2 and bm.num_free_blocks == 1
    bm.may_append(table, 9)
    assert len(table) == 3 and not bm.can_append(table, 13)
    with pytest.raises(RuntimeError):
        bm.append_slot(table, 13)


def test_refcounts_and_double_free() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    ids = bm.allocate(2)
    bm.fork(ids)
    bm.free(ids)
    assert bm.num_free_blocks == 3  # still referenced once
    bm.free(ids)
    assert bm.num_free_blocks == 4
    with pytest.raises(ValueError, match="not allocated"):
        bm.free(ids)


def test_prefix_cache_reuses_full_leading_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(10))
    table, cached = bm.allocate_prompt(tokens)
    assert cached == 0 and len(table) == 3
    hashes: list[int] = []
    bm.cache_full_blocks(table, tokens, hashes)
    assert len(hashes) == 2
    again, cached = bm.allocate_prompt(tokens[:9] + [99])
    assert cached == 8 and again[:2] == table[:2] and again[2] != table[2]
    other, cached = bm.allocate_prompt([0, 1, 2, 7, 4, 5, 6, 7])
    assert cached == 0  # the first block differs, so nothing after it matches either
    assert bm.prefix_hit_tokens == 8 and bm.prefix_query_tokens == 28
    bm.free(table)
    bm.free(again)
    bm.free(other)
    assert bm.num_free_blocks == 8
    # freed but still named: a later identical prompt revives them
    revived, cached = bm.allocate_prompt(tokens)
    assert cached == 8 and revived[:2] == table[:2]
    bm.free(revived)


def test_prefix_cache_keeps_one_token_to_compute_and_evicts() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    tokens = [1, 2, 3, 4]
    table, _ = bm.allocate_prompt(tokens)
    bm.cache_full_blocks(table, tokens, [])
    bm.free(table)
    again, cached = bm.allocate_prompt(tokens)
    assert cached == 2  # the last block is recomputed so the prompt's last token has logits
    bm.free(again)
    fresh = bm.allocate(6)  # takes every block, evicting the names
    bm.free(fresh)
    _, cached = bm.allocate_prompt(tokens)
    assert cached == 0


def test_prefix_caching_can_be_disabled() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    table, _ = bm.allocate_prompt([1, 2, 3])
    bm.cache_full_blocks(table, [1, 2, 3], [])
    _, cached = bm.allocate_prompt([1, 2, 3])
    assert cached == 0
