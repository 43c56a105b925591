"""KV pulls between parallel instances: each decode rank pulls exactly the KV heads it owns.

A prefill instance of ``tp`` ranks holds a request's KV split by heads: its handle lists every rank
that holds a part (``KVHandle.parts``: endpoint, tp rank, which heads). A decode rank caches the
heads ``[start, start + count)``. ``plan_pull`` finds, for each of them, a part that holds it and
groups consecutive heads from one part into a ``PullStep``:

- a part whose heads are exactly this rank's (same tp on both sides) is pulled straight into the
  destination blocks, as between two single-rank instances;
- otherwise (prefill tp 2 -> decode tp 1: gathered from two parts; tp 1 -> tp 2: a slice of one
  part) the part's blocks land in a staging pool shaped like the part's and the heads this rank
  owns are copied into its blocks.

An MLA latent cache has no heads and is replicated: any one part has all of it. A handle without
parts is one part holding every head (a single-rank prefill instance). Whatever cannot be mapped
(other model, dtype, block size, a head no part holds) raises ``TransferError`` from ``plan_pull``,
before any byte moves. Every backend serves the pulls: staging pools get a client of their own,
made once per part layout and reused (pulls through one staging pool take turns).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pdmesh.kv.transfer.base import make_transfer_client
from pdmesh.kv.transfer.errors import TransferError
from pdmesh.kv.transfer.protocols import KVTransferClient
from pdmesh.kv.types import KVHandle, KVLayout, KVPart

if TYPE_CHECKING:
    from pdmesh.kv.transfer.secure import TlsContext


@dataclass(frozen=True)
class RankHeads:
    """The KV heads one rank caches: ``[start, start + count)`` of the model's ``total``."""

    start: int
    count: int
    total: int

    @classmethod
    def whole(cls, layout: KVLayout) -> RankHeads:
        return cls(0, layout.num_kv_heads, layout.num_kv_heads)


@dataclass(frozen=True)
class PullStep:
    """Heads ``src_start ..`` of ``part`` (counted within the part) into heads ``dst_start ..`` of
    this rank's blocks (counted within its own), ``count`` of them; ``direct`` when the part's blocks
    are exactly this rank's."""

    part: KVPart
    src_start: int
    dst_start: int
    count: int
    direct: bool


def parts_of(handle: KVHandle) -> list[KVPart]:
    """The handle's parts; a single-rank prefill's handle is one part holding every head."""
    if handle.parts:
        return list(handle.parts)
    heads = handle.layout.num_kv_heads
    return [KVPart(0, handle.transfer_endpoint, 0, 0, 1, 0, heads, heads)]


def plan_pull(handle: KVHandle, layout: KVLayout, mine: RankHeads, prefer: int = 0) -> list[PullStep]:
    """What this rank (``layout``, caching ``mine``) pulls from which part; ``TransferError`` when it
    cannot be mapped. ``prefer`` (e.g. the tp rank) spreads ranks over parts that hold the same heads."""
    mismatch = layout.mismatch_but_heads(handle.layout)
    if mismatch:
        raise TransferError(mismatch)
    parts = parts_of(handle)
    if layout.kind != "mha":  # a latent row per token: every part holds all of it
        return [PullStep(parts[prefer % len(parts)], 0, 0, layout.num_kv_heads, True)]
    totals = {p.total_heads for p in parts}
    if totals != {mine.total}:
        raise TransferError(
            f"the prefill instance caches {sorted(totals)} KV heads, this rank's model {mine.total}"
        )
    steps: list[PullStep] = []
    for head in range(mine.start, mine.start + mine.count):
        holders = [p for p in parts if head in p.heads]
        if not holders:
            raise TransferError(f"no prefill rank of {handle.handle_id} holds KV head {head}")
        part = holders[prefer % len(holders)]
        last = steps[-1] if steps else None
        if last is not None and last.part == part and last.src_start + last.count == head - part.head_start:
            steps[-1] = dataclasses.replace(last, count=last.count + 1)
        else:
            steps.append(PullStep(part, head - part.head_start, head - mine.start, 1, False))
    return [
        dataclasses.replace(s, direct=s.count == mine.count == s.part.head_count and s.src_start == 0)
        for s in steps
    ]


def part_handle(handle: KVHandle, part: KVPart) -> KVHandle:
    """The handle as one part's transfer server knows it: its endpoint and its layout."""
    return dataclasses.replace(
        handle, transfer_endpoint=part.endpoint, layout=handle.layout.with_heads(part.head_count), parts=[]
    )


def pull_nbytes(handle: KVHandle, steps: list[PullStep], num_blocks: int) -> int:
    """The bytes ``steps`` move for ``num_blocks`` blocks: each step takes its part's whole blocks."""
    return sum(num_blocks * part_handle(handle, s.part).layout.block_nbytes for s in steps)


class _Staging:
    """A pool shaped like one part's blocks, with a client of the backend over it."""

    def __init__(
        self, backend: str, layout: KVLayout, blocks: int, device: torch.device, ssl_context=None
    ) -> None:
        dtype = getattr(torch, layout.dtype)
        self.pool = torch.zeros((blocks, *layout.block_shape), dtype=dtype, device=device)
        self.client = make_transfer_client(backend, self.pool, layout, ssl_context)
        self.lock = threading.Lock()

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


class ShardedPuller:
    """Pulls a handle's KV into this rank's pool, straight or through staging, per ``plan_pull``;
    with ``ssl_context`` (a client context, ``pdmesh.kv.transfer.secure``) every pull runs over TLS."""

    def __init__(
        self,
        backend: str,
        pool: torch.Tensor,
        layout: KVLayout,
        client: KVTransferClient | None = None,
        ssl_context: TlsContext | None = None,
    ) -> None:
        self.backend = backend
        self.pool = pool
        self.layout = layout
        self.ssl_context = ssl_context
        self.client = client or make_transfer_client(backend, pool, layout, ssl_context)
        self._staging: dict[tuple, _Staging] = {}
        self._lock = threading.Lock()

    def pull(
        self, handle: KVHandle, steps: list[PullStep], dst_block_ids: list[int], timeout_s: float
    ) -> None:
        """Runs ``steps`` (from ``plan_pull``) into ``dst_block_ids``; ``TransferError`` on any failure."""
        for step in steps:
            source = part_handle(handle, step.part)
            if step.direct:
                self.client.pull(source, dst_block_ids, timeout_s)
            else:
                self._pull_staged(source, step, dst_block_ids, timeout_s)

    def _staging_for(self, layout: KVLayout, blocks: int) -> _Staging:
        key = (layout.num_kv_heads, layout.block_shape)
        with self._lock:
            staging = self._staging.get(key)
            if staging is None or staging.pool.shape[0] < blocks:
                if staging is not None:
                    staging.close()
                size = max(blocks, 2 * staging.pool.shape[0] if staging is not None else blocks)
                staging = self._staging[key] = _Staging(
                    self.backend, layout, size, self.pool.device, self.ssl_context
                )
            return staging

    def _pull_staged(self, source: KVHandle, step: PullStep, dst: list[int], timeout_s: float) -> None:
        staging = self._staging_for(source.layout, len(dst))
        with staging.lock:
            staging.client.pull(source, list(range(len(dst))), timeout_s)
            src_heads = slice(step.src_start, step.src_start + step.count)
            dst_heads = slice(step.dst_start, step.dst_start + step.count)
            index = torch.tensor(dst, dtype=torch.long, device=self.pool.device)
            blocks = self.pool.index_select(0, index)  # [n, layers, 2, block, heads, dim]
            blocks[..., dst_heads, :] = staging.pool[: len(dst)][..., src_heads, :]
            self.pool.index_copy_(0, index, blocks)

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()
        with self._lock:
            staged, self._staging = list(self._staging.values()), {}
        for staging in staged:
            staging.close()
