"""Running small CPU ops on one thread.

Every ATen op above its grain size opens an OpenMP parallel region. On an idle machine that costs
microseconds; on a loaded one (more runnable threads than cores) the region waits until every team
thread is scheduled, which on the 2-core bench machine measured about 8 ms per region against
about 50 us for the same block gather or decode SDPA run on one thread. Ops whose work is only
tens of microseconds gain nothing from a second thread even when idle, so a CPU decode step runs
inside ``single_thread`` and only its products (the projections, the attention of large batches)
take the configured threads back with ``all_threads``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_outer_threads: int | None = None  # the count single_thread replaced, for all_threads inside it


@contextmanager
def single_thread(enabled: bool = True) -> Iterator[None]:
    """Sets torch's intra-op threads to 1 for the block (a no-op when not ``enabled`` or already 1).

    ``torch.set_num_threads`` is process-wide and costs under a microsecond; the previous count is
    restored on exit, also after an exception. ``all_threads`` inside the block gets it back.
    """
    global _outer_threads
    threads = torch.get_num_threads() if enabled else 1
    if threads == 1:
        yield
        return
    saved, _outer_threads = _outer_threads, threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _outer_threads = saved


def configured_threads() -> int:
    """The intra-op thread count the process is configured for (also inside ``single_thread``)."""
    return _outer_threads or torch.get_num_threads()


@contextmanager
def all_threads() -> Iterator[None]:
    """Inside ``single_thread``: the configured threads for one heavy op (a product); else a no-op."""
    outer = _outer_threads
    if outer is None or torch.get_num_threads() != 1:
        yield
        return
    torch.set_num_threads(outer)
    try:
        yield
    finally:
        torch.set_num_threads(1)
