"""What a transfer backend implements: a server and a client over one KV pool.

The prefill side's ``KVTransferServer`` serves only the blocks it pinned for an exposed handle; the
decode side's ``KVTransferClient`` writes straight into its destination blocks and raises
``TransferError`` (``pdmesh.kv.transfer.errors``) on any failure, timeout or layout mismatch. Both
work over the instance's KV pool, one tensor ``[num_blocks, *layout.block_shape]`` that
``check_pool`` accepts.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from pdmesh.kv.types import KVHandle, KVLayout


@runtime_checkable
class KVTransferServer(Protocol):
    """Prefill side: serves the blocks of exposed handles to pulling peers."""

    @property
    def endpoint(self) -> str: ...

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def expose(self, handle_id: str, block_ids: list[int], secret: str = "") -> None: ...
    def withdraw(self, handle_id: str) -> None: ...


@runtime_checkable
class KVTransferClient(Protocol):
    """Decode side: pulls a handle's blocks into local blocks (blocking, thread-safe)."""

    def pull(self, handle: KVHandle, dst_block_ids: list[int], timeout_s: float) -> None: ...


def check_pool(kv_pool: torch.Tensor, layout: KVLayout) -> None:
    """Refuses a pool that is not one contiguous ``[num_blocks, *block_shape]`` tensor of the layout's dtype."""
    if tuple(kv_pool.shape[1:]) != tuple(layout.block_shape):
        raise ValueError(
            f"KV pool shape {tuple(kv_pool.shape)} does not match block_shape {layout.block_shape}"
        )
    if kv_pool.dtype != getattr(torch, layout.dtype):
        raise ValueError(f"KV pool dtype {kv_pool.dtype} does not match layout dtype {layout.dtype}")
    if not kv_pool.is_contiguous():
        raise ValueError("the KV pool must be one contiguous tensor")
