"""CPU KV pools on transparent huge pages: zeroed, contiguous, aligned, and served by the tcp backend."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pdmesh.kv.transfer import hostmem
from pdmesh.kv.transfer.base import allocate_pool
from pdmesh.kv.types import KVLayout

pytestmark = pytest.mark.timeout(30)

LAYOUT = KVLayout("tiny", "mha", 2, 2, 8, 16, "float32", (2, 2, 16, 2, 8))  # 16 KiB blocks
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _anon_huge_kib_around(address: int) -> int:
    """AnonHugePages of the mapping holding ``address`` (this process's /proc/self/smaps): the
    pool's own memory, whatever other tests allocate or free meanwhile."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_large_pool_is_zeroed_contiguous_and_huge_page_aligned() -> None:
    pool = allocate_pool("tcp", 512, LAYOUT)  # 8 MiB
    assert pool.shape == (512, *LAYOUT.block_shape)
    assert pool.dtype == torch.float32
    assert pool.is_contiguous()
    assert not pool.any()
    if sys.platform.startswith("linux"):
        assert pool.data_ptr() % hostmem.HUGE_PAGE == 0
    pool[511].fill_(3.0)  # the whole range is usable memory
    assert float(pool[511].sum()) == 3.0 * LAYOUT.block_nbytes / 4


def test_small_pool_is_plain_zeros() -> None:
    pool = allocate_pool("tcp", 4, LAYOUT)
    assert pool.shape == (4, *LAYOUT.block_shape)
    assert pool.storage_offset() == 0
    assert not pool.any()


def test_bfloat16_pool_keeps_its_dtype() -> None:
    tensor = hostmem.zeros((300, 4096), torch.bfloat16)
    assert tensor.dtype == torch.bfloat16
    assert tensor.shape == (300, 4096)
    assert not tensor.any()


def test_pool_memory_is_on_huge_pages_where_the_kernel_allows() -> None:
    # THP "always"/"madvise" (the usual defaults): most of a 16 MiB pool on huge pages (khugepaged
    # may lag on the rest); "never" or no THP: plain pages, and the pool still works
    allowed = THP.exists() and "[never]" not in THP.read_text()
    pool = hostmem.zeros((16 << 20,), torch.uint8)
    huge = _anon_huge_kib_around(pool.data_ptr())
    assert huge >= 8 << 10 if allowed else huge == 0
    pool[::4096] = 1
    assert int(pool.sum()) == (16 << 20) // 4096
    del pool
