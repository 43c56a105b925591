"""The transfer interface: the prefill side exposes pinned blocks, the decode side pulls them.

A backend provides a ``KVTransferServer`` (prefill side) and a ``KVTransferClient`` (decode side)
over the instance's KV pool, one tensor ``[num_blocks, *layout.block_shape]``. The server only ever
serves the blocks it pinned for an exposed handle; the client writes straight into its destination
blocks and raises ``TransferError`` on any failure, timeout or layout mismatch (the caller then
frees those blocks: their contents are undefined).

Backends (see ``docs/transfer.md``): ``tcp`` (portable, across hosts), ``shm`` (same host; the
prefill pool must come from ``allocate_pool("shm", ...)``), ``device`` (torch.distributed point to
point: gloo, nccl or hccl after the pool's device), ``cuda_ipc`` (GPUs of one node) and
``mooncake`` (the Mooncake Transfer Engine over TCP; listed only where ``mooncake.engine`` imports).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from pdmesh.kv.transfer import hostmem
from pdmesh.kv.types import KVHandle, KVLayout

if TYPE_CHECKING:
    from pdmesh.kv.transfer.secure import TlsContext

MOONCAKE_PACKAGE = "mooncake-transfer-engine-non-cuda"


def _mooncake_missing() -> str | None:
    """Why the ``mooncake`` backend cannot load here, or None when ``mooncake.engine`` imports."""
    try:
        import mooncake.engine  # noqa: F401
    except ImportError as exc:  # no wheel, or its engine misses a shared library (libibverbs.so.1)
        return (
            f"the mooncake transfer backend needs the {MOONCAKE_PACKAGE} package "
            f"(pip install {MOONCAKE_PACKAGE}; on Debian its engine also needs libibverbs1): {exc}"
        )
    return None


MOONCAKE_MISSING = _mooncake_missing()
BACKENDS = ("tcp", "shm", "device", "cuda_ipc") + (("mooncake",) if MOONCAKE_MISSING is None else ())


class TransferError(Exception):
    """A pull failed; no partial KV may be used."""


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


def _unknown(backend: str) -> ValueError:
    if backend == "mooncake" and MOONCAKE_MISSING is not None:
        return ValueError(MOONCAKE_MISSING)
    return ValueError(f"unknown KV transfer backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def allocate_pool(
    backend: str, num_blocks: int, layout: KVLayout, name: str = "", device: str | torch.device = "cpu"
) -> torch.Tensor:
    """A zeroed ``[num_blocks, *layout.block_shape]`` KV pool that ``backend`` can serve.

    ``shm`` needs this: the pool lives in a shared-memory segment served as ``shm://NAME`` (``name``
    must be unique on the host, e.g. the instance id; CPU only). The other backends serve any
    contiguous pool; for them this is ``torch.zeros`` on ``device``, on transparent huge pages for a CPU
    pool (``hostmem``: halves the kernel's cost of copying a pull into it).
    """
    if backend not in BACKENDS:
        raise _unknown(backend)
    if backend == "shm":
        if torch.device(device).type != "cpu":
            raise ValueError(f"the shm backend needs a CPU pool, not {device}")
        from pdmesh.kv.transfer.shm import allocate

        return allocate(num_blocks, layout, name)
    shape, dtype = (num_blocks, *layout.block_shape), getattr(torch, layout.dtype)
    if torch.device(device).type == "cpu":
        return hostmem.zeros(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


def make_transfer_server(
    backend: str,
    kv_pool: torch.Tensor,
    layout: KVLayout,
    host: str,
    port: int = 0,
    ssl_context: TlsContext | None = None,
) -> KVTransferServer:
    """The prefill-side server of ``backend`` over ``kv_pool`` (call ``start()`` on it).

    ``host``/``port`` bind the control socket of ``tcp``, ``device``, ``cuda_ipc`` and ``mooncake``; ``shm``
    listens on a Unix socket named after its pool's segment and ignores them. ``ssl_context`` (a
    server context or ``SslContextCache``; ``pdmesh.kv.transfer.secure``) puts that socket under
    mutual TLS; None: plaintext.
    """
    if backend == "tcp":
        from pdmesh.kv.transfer.tcp import TcpTransferServer

        return TcpTransferServer(kv_pool, layout, host, port, ssl_context)
    if backend == "shm":
        from pdmesh.kv.transfer.shm import ShmTransferServer

        return ShmTransferServer(kv_pool, layout, ssl_context)
    if backend == "device":
        from pdmesh.kv.transfer.device import DeviceTransferServer

        return DeviceTransferServer(kv_pool, layout, host, port, ssl_context)
    if backend == "cuda_ipc":
        from pdmesh.kv.transfer.cuda_ipc import CudaIpcTransferServer

        return CudaIpcTransferServer(kv_pool, layout, host, port, ssl_context)
    if backend == "mooncake" and backend in BACKENDS:
        from pdmesh.kv.transfer.mooncake import MooncakeTransferServer

        return MooncakeTransferServer(kv_pool, layout, host, port, ssl_context)
    raise _unknown(backend)


def make_transfer_client(
    backend: str, kv_pool: torch.Tensor, layout: KVLayout, ssl_context: TlsContext | None = None
) -> KVTransferClient:
    """The decode-side client of ``backend`` writing into ``kv_pool``; ``ssl_context`` (a client
    context or ``SslContextCache``) for servers under TLS."""
    if backend == "tcp":
        from pdmesh.kv.transfer.tcp import TcpTransferClient

        return TcpTransferClient(kv_pool, layout, ssl_context)
    if backend == "shm":
        from pdmesh.kv.transfer.shm import ShmTransferClient

        return ShmTransferClient(kv_pool, layout, ssl_context)
    if backend == "device":
        from pdmesh.kv.transfer.device import DeviceTransferClient

        return DeviceTransferClient(kv_pool, layout, ssl_context)
    if backend == "cuda_ipc":
        from pdmesh.kv.transfer.cuda_ipc import CudaIpcTransferClient

        return CudaIpcTransferClient(kv_pool, layout, ssl_context)
    if backend == "mooncake" and backend in BACKENDS:
        from pdmesh.kv.transfer.mooncake import MooncakeTransferClient

        return MooncakeTransferClient(kv_pool, layout, ssl_context)
    raise _unknown(backend)
