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
