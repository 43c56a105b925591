"""Choosing a transfer backend: a table of backends, each module imported only when chosen.

A backend provides a ``KVTransferServer`` (prefill side) and a ``KVTransferClient`` (decode side)
over the instance's KV pool (``pdmesh.kv.transfer.protocols``); a failed pull raises
``TransferError`` (``pdmesh.kv.transfer.errors``).

Backends (see ``docs/transfer.md``): ``tcp`` (portable, across hosts), ``shm`` (same host; the
prefill pool must come from ``allocate_pool("shm", ...)``), ``device`` (torch.distributed point to
point: gloo, nccl or hccl after the pool's device), ``cuda_ipc`` (GPUs of one node) and
``mooncake`` (the Mooncake Transfer Engine over TCP; listed only where ``mooncake.engine`` imports).
Importing this module imports no backend: a worker loads only the one it runs (Mooncake's engine
loads shared libraries and starts nothing useful for the others).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pdmesh.kv.transfer import hostmem
from pdmesh.kv.types import KVLayout

if TYPE_CHECKING:
    from pdmesh.kv.transfer.protocols import KVTransferClient, KVTransferServer
    from pdmesh.kv.transfer.secure import TlsContext

MOONCAKE_PACKAGE = "mooncake-transfer-engine-non-cuda"


@dataclass(frozen=True)
class Backend:
    """One row of the table: where a backend's classes live and what it needs of the host."""

    module: str  # imported only when the backend is chosen
    server: str  # class names in ``module``
    client: str
    where: str  # what it supports (hosts, pool devices), as docs/transfer.md's table says
    binds: bool = True  # its server binds a host:port control socket (shm's listens on a Unix socket)
    allocator: str = ""  # a function of ``module`` that must allocate the pool (then CPU only)
    requires: str = ""  # a module that must import here, checked when listed or chosen
    missing: str = ""  # the error when ``requires`` does not import (followed by the ImportError)


_MOONCAKE_MISSING = (
    f"the mooncake transfer backend needs the {MOONCAKE_PACKAGE} package "
    f"(pip install 'pdmesh[mooncake]' or {MOONCAKE_PACKAGE}; on Debian its engine also needs libibverbs1)"
)

TABLE: dict[str, Backend] = {
    "tcp": Backend("pdmesh.kv.transfer.tcp", "TcpTransferServer", "TcpTransferClient", where="any two hosts"),
    "shm": Backend(
        "pdmesh.kv.transfer.shm", "ShmTransferServer", "ShmTransferClient", where="one host, CPU pools",
        binds=False, allocator="allocate",
    ),
    "device": Backend(
        "pdmesh.kv.transfer.device", "DeviceTransferServer", "DeviceTransferClient",
        where="any two hosts; gloo (CPU), nccl (CUDA) or hccl (Ascend) after the pool's device",
    ),
    "cuda_ipc": Backend(
        "pdmesh.kv.transfer.cuda_ipc", "CudaIpcTransferServer", "CudaIpcTransferClient", where="GPUs of one node"
    ),
    "mooncake": Backend(
        "pdmesh.kv.transfer.mooncake", "MooncakeTransferServer", "MooncakeTransferClient",
        where="any two hosts, CPU pools", requires="mooncake.engine", missing=_MOONCAKE_MISSING,
    ),
}  # fmt: skip


def missing(name: str) -> str | None:
    """Why backend ``name`` cannot load here, or None when it can (imports its requirement, if any)."""
    backend = TABLE[name]
    if not backend.requires:
        return None
    try:
        importlib.import_module(backend.requires)
    except ImportError as exc:  # no wheel, or its engine misses a shared library (libibverbs.so.1)
        return f"{backend.missing}: {exc}"
    return None


def available_backends() -> tuple[str, ...]:
    """The backends this host can run, in the table's order."""
    return tuple(name for name in TABLE if missing(name) is None)


def __getattr__(attr: str) -> tuple[str, ...]:
    # ``BACKENDS`` is computed on access, not at import: listing mooncake means importing its engine
    if attr == "BACKENDS":
        return available_backends()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _chosen(name: str) -> Backend:
    """The table row of ``name``; ``ValueError`` naming the choices, or what a known backend lacks here."""
    if name not in TABLE:
        raise ValueError(
            f"unknown KV transfer backend {name!r}; choose one of {', '.join(available_backends())}"
        )
    reason = missing(name)
    if reason is not None:
        raise ValueError(reason)
    return TABLE[name]


def _load(name: str, attr: str):
    """Imports backend ``name``'s module and returns its attribute ``attr``."""
    return getattr(importlib.import_module(TABLE[name].module), attr)


def allocate_pool(
    backend: str, num_blocks: int, layout: KVLayout, name: str = "", device: str | torch.device = "cpu"
) -> torch.Tensor:
    """A zeroed ``[num_blocks, *layout.block_shape]`` KV pool that ``backend`` can serve.

    ``shm`` needs this: the pool lives in a shared-memory segment served as ``shm://NAME`` (``name``
    must be unique on the host, e.g. the instance id; CPU only). The other backends serve any
    contiguous pool; for them this is ``torch.zeros`` on ``device``, on transparent huge pages for a CPU
    pool (``hostmem``: halves the kernel's cost of copying a pull into it).
    """
    row = _chosen(backend)
    if row.allocator:
        if torch.device(device).type != "cpu":
            raise ValueError(f"the {backend} backend needs a CPU pool, not {device}")
        return _load(backend, row.allocator)(num_blocks, layout, name)
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
    row = _chosen(backend)
    server = _load(backend, row.server)
    if row.binds:
        return server(kv_pool, layout, host, port, ssl_context)
    return server(kv_pool, layout, ssl_context)


def make_transfer_client(
    backend: str, kv_pool: torch.Tensor, layout: KVLayout, ssl_context: TlsContext | None = None
) -> KVTransferClient:
    """The decode-side client of ``backend`` writing into ``kv_pool``; ``ssl_context`` (a client
    context or ``SslContextCache``) for servers under TLS."""
    return _load(backend, _chosen(backend).client)(kv_pool, layout, ssl_context)
