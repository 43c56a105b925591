"""The ``cuda_ipc`` transfer backend: prefill and decode on GPUs of one node, copied device to device.

The decode worker maps the prefill worker's whole KV pool once through a CUDA IPC handle
(``UntypedStorage._share_cuda_()`` on the prefill side, ``UntypedStorage._new_shared_cuda`` on the
decode side, what ``torch.multiprocessing`` does under the hood) and then copies runs of blocks
with ``copy_`` on its current stream (peer to peer between two GPUs, or within one).

Wire protocol (control frames as in ``wire`` over TCP, normally loopback; one pull per connection):

1. client -> server: the pull hello plus ``"mapped": SEGMENT_ID or null``
2. server -> client: ``{"ok": true, "block_ids": [...], "segment": SEGMENT_ID, "token": T,
   "ipc": {...}}``; ``ipc`` (the ``_share_cuda_`` fields, bytes in base64, the pool's shape) only
   when the client does not hold that segment yet.
3. the client copies, synchronizes its stream, and sends ``{"op": "done"}``; the server answers
   ``{"ok": true}`` only while the handle is still exposed as at step 2.

The prefill worker must have finished writing a handle's blocks (stream synchronized) before it
exposes them. A prefill worker that dies is seen as a refused connection or a lost acknowledgement.
Both ends need CUDA; it is tested only where a GPU is present.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import time

import torch

from pdmesh.kv.transfer import secure, wire
from pdmesh.kv.transfer.errors import ProtocolError, TransferError
from pdmesh.kv.transfer.protocols import check_pool
from pdmesh.kv.transfer.tcp import advertised_host, parse_endpoint
from pdmesh.kv.types import KVHandle, KVLayout

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 10.0
_SHARE_FIELDS = (
    "device",
    "handle",
    "size_bytes",
    "offset_bytes",
    "ref_counter_handle",
    "ref_counter_offset",
    "event_handle",
    "event_sync_required",
)


def share(pool: torch.Tensor) -> dict:
    """The JSON-safe description of ``pool``'s CUDA IPC handle."""
    fields = dict(zip(_SHARE_FIELDS, pool.untyped_storage()._share_cuda_(), strict=True))
    for key, value in fields.items():
        if isinstance(value, bytes):
            fields[key] = {"b64": base64.b64encode(value).decode()}
    return {**fields, "shape": list(pool.shape), "storage_offset": pool.storage_offset()}


def open_shared(ipc: dict, dtype: torch.dtype) -> torch.Tensor:
    """The peer's pool, mapped into this process from ``share``'s description."""
    args = [base64.b64decode(ipc[k]["b64"]) if isinstance(ipc[k], dict) else ipc[k] for k in _SHARE_FIELDS]
    storage = torch.UntypedStorage._new_shared_cuda(*args)
    shape = torch.Size(ipc["shape"])
    pool = torch.empty(0, dtype=dtype, device=torch.device("cuda", ipc["device"]))
    return pool.set_(storage, ipc["storage_offset"], shape, _contiguous_strides(shape))


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def before_ack() -> None:
    """Runs on the server between the copy and its acknowledgement (tests slow it down)."""


class CudaIpcTransferServer(wire.ExposingServer):
    """Prefill side of ``cuda_ipc``: hands out the pool's IPC handle and the exposed block ids."""

    def __init__(
        self,
        kv_pool: torch.Tensor,
        layout: KVLayout,
        host: str,
        port: int = 0,
        ssl_context: secure.TlsContext | None = None,
    ) -> None:
        check_pool(kv_pool, layout)
        self.ssl_context = ssl_context
        if kv_pool.device.type != "cuda":
            raise ValueError(f"the cuda_ipc backend needs a CUDA pool, not {kv_pool.device}")
        self.layout = layout
        self.pool = kv_pool
        self.host = host
        self.port = port
        self._segment = f"{os.getpid()}-{kv_pool.data_ptr():x}"
        self._ipc = share(kv_pool)
        self._exposed = wire.ExposedTable(kv_pool.shape[0])
        self._control: wire.ControlServer | None = None

    @property
    def endpoint(self) -> str:
        return f"cuda_ipc://{advertised_host(self.host)}:{self.port}"

    def start(self) -> None:
        if self._control is None:
            listener = socket.create_server((self.host, self.port), backlog=128)
            self.port = listener.getsockname()[1]
            self._control = wire.ControlServer(
                listener, self._serve, f"kv-cuda-ipc-{self.port}", self.ssl_context
            )

    def stop(self) -> None:
        if self._control is not None:
            self._control.stop()
            self._control = None

    def _serve(self, conn: socket.socket, peer) -> None:
        conn.settimeout(wire.HANDSHAKE_TIMEOUT_S)
        hello = wire.recv_frame(conn)
        with wire.pull_span(hello, "cuda_ipc"):
            self._serve_pull(conn, peer, hello)

    def _serve_pull(self, conn: socket.socket, peer, hello: dict) -> None:
        admitted = self._exposed.admit(conn, hello, self.layout, peer)
        if admitted is None:
            return
        block_ids, token = admitted
        reply = {"ok": True, "block_ids": list(block_ids), "segment": self._segment, "token": token}
        if hello.get("mapped") != self._segment:
            reply["ipc"] = self._ipc
        wire.send_frame(conn, reply)
        conn.settimeout(ACK_TIMEOUT_S + wire.HANDSHAKE_TIMEOUT_S)
        done = wire.recv_frame(conn)
        before_ack()
        still = done.get("op") == "done" and self._exposed.still(hello["handle_id"], token)
        wire.send_frame(conn, {"ok": still})
        if still:  # the client copied the blocks out of this pool itself
            self._served(len(block_ids), self.layout.block_nbytes)


class CudaIpcTransferClient:
    """Decode side of ``cuda_ipc``: maps each prefill pool once and copies runs of blocks from it."""

    def __init__(
        self, kv_pool: torch.Tensor, layout: KVLayout, ssl_context: secure.TlsContext | None = None
    ) -> None:
        check_pool(kv_pool, layout)
        self.ssl_context = ssl_context
        if kv_pool.device.type != "cuda":
            raise ValueError(f"the cuda_ipc backend needs a CUDA pool, not {kv_pool.device}")
        self.layout = layout
        self.pool = kv_pool
        self._maps: dict[str, tuple[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def pull(self, handle: KVHandle, dst_block_ids: list[int], timeout_s: float) -> None:
        """Copies every block of ``handle`` into ``dst_block_ids`` or raises ``TransferError``."""
        wire.check_preconditions(self.layout, handle, dst_block_ids, self.pool.shape[0])
        address = parse_endpoint(handle.transfer_endpoint.replace("cuda_ipc://", "tcp://", 1))
        deadline = time.monotonic() + timeout_s
        with wire.pull_errors(handle, timeout_s):
            try:
                connect_s = min(wire.CONNECT_TIMEOUT_S, timeout_s)
                with secure.dial(address, connect_s, self.ssl_context, handle.transfer_endpoint) as sock:
                    self._exchange(sock, handle, list(dst_block_ids), deadline)
            except RuntimeError as exc:  # CUDA refused the handle or the copy
                raise TransferError(f"cuda_ipc pull of {handle.handle_id} failed: {exc}") from exc

    def _exchange(
        self, sock: socket.socket, handle: KVHandle, dst_block_ids: list[int], deadline: float
    ) -> None:
        endpoint = handle.transfer_endpoint
        with self._lock:
            mapped = self._maps.get(endpoint)
        wire.send_frame(
            sock, wire.hello(handle.handle_id, self.layout, handle.secret, mapped=mapped and mapped[0])
        )
        reply = wire.recv_frame(sock, deadline)
        if not reply.get("ok"):
            raise wire.refused(handle, reply)
        src_ids = reply["block_ids"]
        wire.check_count(handle, {"num_blocks": len(src_ids)}, dst_block_ids)
        if mapped is None or mapped[0] != reply["segment"]:
            if "ipc" not in reply:
                raise ProtocolError("the server did not pass its IPC handle")
            mapped = (reply["segment"], open_shared(reply["ipc"], self.pool.dtype))
            with self._lock:
                self._maps[endpoint] = mapped
        source = mapped[1]
        for src, dst, count in wire.paired_runs(src_ids, dst_block_ids):
            self.pool[dst : dst + count].copy_(source[src : src + count], non_blocking=True)
        torch.cuda.current_stream(self.pool.device).synchronize()
        wire.send_frame(sock, {"op": "done"})
        if not wire.recv_frame(sock, deadline).get("ok"):
            raise TransferError(f"{handle.handle_id} was withdrawn at {endpoint} during the copy")
