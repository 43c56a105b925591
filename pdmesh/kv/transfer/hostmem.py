"""Host memory for CPU KV pools: zeroed tensors backed by transparent huge pages where Linux allows.

Why: a pull's cost on the receiving side is the kernel's copy from socket buffers into the pool, and
on a 4 KiB-page pool that copy spends much of its time on TLB misses (worse in a VM, where each miss
walks two page tables). With the pool on 2 MiB pages the receiver's CPU time for a 64 MiB tcp pull
fell from ~40 ms to ~17 ms on the 2-core dev VM (docs/transfer.md). The engine reads the same pool
for attention and may gain too (not measured).

How: map fresh anonymous memory one huge page larger than asked, ``madvise(MADV_HUGEPAGE)`` the
2 MiB-aligned range before anything touches it, then zero it (the first touch faults huge pages in).
Not from ``torch.empty``: its memory comes from malloc, which may hand back heap memory an earlier
tensor already faulted in on 4 KiB pages (the advice then changes nothing until khugepaged gets
there); a fresh mapping has no pages yet. This works with THP set to
``always`` or ``madvise`` (the usual defaults); with ``never``, or off Linux, the pool is plain memory.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import sys

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux, every architecture


def _madvise_huge(address: int, length: int) -> bool:
    """Asks the kernel for huge pages over ``[address, address + length)``; False if refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), ctypes.c_int(_MADV_HUGEPAGE))
    except (OSError, AttributeError):
        return False
    if rc != 0:
        log.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
    return rc == 0


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed contiguous CPU tensor, on transparent huge pages when it spans at least one."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not sys.platform.startswith("linux"):
        return torch.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # the tensor's storage holds the mapping (never closed by hand: that would leave it dangling)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    _madvise_huge(raw.data_ptr() + start, nbytes)
    return raw[start : start + nbytes].zero_().view(dtype).view(shape)
