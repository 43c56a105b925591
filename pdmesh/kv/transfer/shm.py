"""The ``shm`` transfer backend: same host; the prefill pool lives in shared memory, a pull is a copy.

The prefill worker allocates its KV pool with ``allocate_pool("shm", num_blocks, layout, name)``:
an anonymous ``memfd`` segment mapped ``MAP_SHARED`` (no file in ``/dev/shm`` to leak when a worker
is killed, and no ``/dev/shm`` size limit such as Docker's 64 MiB default). Its server listens on a
Unix socket named after the segment, the abstract ``\\0pdmesh-kv-NAME`` (the same network namespace
is needed: one host or one pod), or ``$PDMESH_SHM_SOCKET_DIR/pdmesh-kv-NAME.sock`` when that
variable is set (shared through a volume between containers). The endpoint is ``shm://NAME``.

Wire protocol (one pull per connection, control frames as in ``wire``):

1. client -> server: the hello plus ``"mapped": SEGMENT_ID or null`` (the segment it holds mapped)
2. server -> client: ``{"ok": true, "block_ids": [...], "pool_blocks": P, "block_nbytes": B,
   "segment": SEGMENT_ID, "token": T}`` (or ``{"ok": false, "error": ...}``); when the client does
   not hold that segment yet, one byte follows carrying the segment's fd (``SCM_RIGHTS``).
3. the client maps the segment (once; cached by name and segment id), checks its size, and copies
   each stretch of consecutive source and destination ids with one ``copy_``.
4. client -> server ``{"op": "done"}``; server -> client ``{"ok": true}`` only while the handle is
   still exposed as it was at step 2. A withdrawn handle or a server gone by then fails the pull.

Under TLS (``secure``) the control connection is a TLS session over the Unix socket; the fd byte of
step 2 still travels beside it on the socket itself (``SCM_RIGHTS`` cannot ride in TLS records),
right after the reply's record, where both ends are between two whole records.

A segment that disappeared (its worker exited) shows as a control socket nobody listens on; the
client then drops its mapping and raises ``TransferError``.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import threading
import time
import weakref

import torch

from pdmesh.kv.transfer import secure, wire
from pdmesh.kv.transfer.errors import ProtocolError, TransferError
from pdmesh.kv.transfer.protocols import check_pool
from pdmesh.kv.types import KVHandle, KVLayout

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 10.0
_SEGMENTS: dict[int, tuple[str, int]] = {}  # pool data_ptr -> (name, memfd)


def socket_address(name: str) -> str:
    """The control socket of segment ``name``: abstract, or a path under ``$PDMESH_SHM_SOCKET_DIR``."""
    directory = os.environ.get("PDMESH_SHM_SOCKET_DIR")
    if directory:
        return os.path.join(directory, f"pdmesh-kv-{name}.sock")
    return f"\0pdmesh-kv-{name}"


def parse_endpoint(endpoint: str) -> str:
    """``shm://NAME`` -> ``NAME``."""
    if not endpoint.startswith("shm://") or not endpoint[len("shm://") :]:
        raise TransferError(f"not a shm transfer endpoint: {endpoint!r}")
    return endpoint[len("shm://") :]


def _map(fd: int, nbytes: int) -> mmap.mmap:
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, nbytes, flags, mmap.PROT_READ | mmap.PROT_WRITE)


def _as_pool(mapping: mmap.mmap, num_blocks: int, layout: KVLayout) -> torch.Tensor:
    flat = torch.frombuffer(mapping, dtype=torch.uint8)
    return flat.view(getattr(torch, layout.dtype)).view(num_blocks, *layout.block_shape)


def allocate(num_blocks: int, layout: KVLayout, name: str) -> torch.Tensor:
    """A zeroed ``[num_blocks, *block_shape]`` pool in a shared-memory segment that ``shm`` serves as ``name``."""
    if not name or "/" in name:
        raise ValueError(f"a shm pool needs a name without '/', got {name!r}")
    nbytes = num_blocks * layout.block_nbytes
    fd = os.memfd_create(f"pdmesh-kv-{name}", os.MFD_CLOEXEC)
    os.ftruncate(fd, nbytes)
    pool = _as_pool(_map(fd, nbytes), num_blocks, layout)
    key = pool.data_ptr()
    _SEGMENTS[key] = (name, fd)
    weakref.finalize(pool, _forget, key, fd)
    return pool


def _forget(key: int, fd: int) -> None:
    _SEGMENTS.pop(key, None)
    os.close(fd)


def segment_of(kv_pool: torch.Tensor) -> tuple[str, int]:
    """``(name, fd)`` of a pool from ``allocate``; ``ValueError`` for any other tensor."""
    entry = _SEGMENTS.get(kv_pool.data_ptr())
    if entry is None:
        raise ValueError('the shm backend needs a pool from allocate_pool("shm", num_blocks, layout, name)')
    return entry


def before_ack() -> None:
    """Runs on the server between the copy and its acknowledgement (tests slow it down)."""


class ShmTransferServer(wire.ExposingServer):
    """Prefill side of ``shm``: hands out its segment and the exposed block ids over a Unix socket."""

    def __init__(
        self, kv_pool: torch.Tensor, layout: KVLayout, ssl_context: secure.TlsContext | None = None
    ) -> None:
        check_pool(kv_pool, layout)
        self.layout = layout
        self.ssl_context = ssl_context
        self.name, self._fd = segment_of(kv_pool)
        self._pool_blocks = kv_pool.shape[0]
        self._segment = f"{os.getpid()}-{os.fstat(self._fd).st_ino}"
        self._exposed = wire.ExposedTable(self._pool_blocks)
        self._control: wire.ControlServer | None = None

    @property
    def endpoint(self) -> str:
        return f"shm://{self.name}"

    def start(self) -> None:
        if self._control is not None:
            return
        address = socket_address(self.name)
        if not address.startswith("\0") and os.path.exists(address):
            os.unlink(address)  # a stale socket file from a worker that died
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(128)
        self._control = wire.ControlServer(listener, self._serve, f"kv-shm-{self.name}", self.ssl_context)
        log.info("KV shm transfer server on %s", self.endpoint)

    def stop(self) -> None:
        if self._control is not None:
            self._control.stop()
            self._control = None
            address = socket_address(self.name)
            if not address.startswith("\0") and os.path.exists(address):
                os.unlink(address)

    def _serve(self, conn: socket.socket, peer) -> None:
        conn.settimeout(wire.HANDSHAKE_TIMEOUT_S)
        hello = wire.recv_frame(conn)
        with wire.pull_span(hello, "shm"):
            self._serve_pull(conn, peer, hello)

    def _serve_pull(self, conn: socket.socket, peer, hello: dict) -> None:
        admitted = self._exposed.admit(conn, hello, self.layout, peer)
        if admitted is None:
            return
        block_ids, token = admitted
        reply = {
            "ok": True,
            "block_ids": list(block_ids),
            "pool_blocks": self._pool_blocks,
            "block_nbytes": self.layout.block_nbytes,
            "segment": self._segment,
            "token": token,
        }
        wire.send_frame(conn, reply)
        if hello.get("mapped") != self._segment:
            with secure.raw(conn) as plain:
                socket.send_fds(plain, [b"F"], [self._fd])
        conn.settimeout(ACK_TIMEOUT_S + wire.HANDSHAKE_TIMEOUT_S)
        done = wire.recv_frame(conn)
        before_ack()
        still = done.get("op") == "done" and self._exposed.still(hello["handle_id"], token)
        wire.send_frame(conn, {"ok": still})
        if still:  # the client copied the blocks out of this pool itself
            self._served(len(block_ids), self.layout.block_nbytes)


class _Mapping:
    """One prefill segment mapped into this process."""

    def __init__(self, segment: str, fd: int, pool_blocks: int, layout: KVLayout) -> None:
        self.segment = segment
        try:
            nbytes = pool_blocks * layout.block_nbytes
            if os.fstat(fd).st_size < nbytes:
                raise ProtocolError(f"segment {segment} is smaller than {pool_blocks} blocks")
            self.pool = _as_pool(_map(fd, nbytes), pool_blocks, layout)
        finally:
            os.close(fd)


class ShmTransferClient:
    """Decode side of ``shm``: maps prefill segments by name and copies runs of blocks out of them."""

    def __init__(
        self, kv_pool: torch.Tensor, layout: KVLayout, ssl_context: secure.TlsContext | None = None
    ) -> None:
        check_pool(kv_pool, layout)
        self.layout = layout
        self.pool = kv_pool
        self.ssl_context = ssl_context
        self._maps: dict[str, _Mapping] = {}
        self._lock = threading.Lock()

    def pull(self, handle: KVHandle, dst_block_ids: list[int], timeout_s: float) -> None:
        """Copies every block of ``handle`` into ``dst_block_ids`` or raises ``TransferError``."""
        wire.check_preconditions(self.layout, handle, dst_block_ids, self.pool.shape[0])
        name = parse_endpoint(handle.transfer_endpoint)
        deadline = time.monotonic() + timeout_s
        with wire.pull_errors(handle, timeout_s):
            sock = self._connect(name, handle, timeout_s)
            with sock:
                self._exchange(sock, name, handle, list(dst_block_ids), deadline)

    def _connect(self, name: str, handle: KVHandle, timeout_s: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(min(wire.CONNECT_TIMEOUT_S, timeout_s))
        try:
            sock.connect(socket_address(name))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            with self._lock:
                self._maps.pop(name, None)
            raise TransferError(
                f"shm segment {name!r} of {handle.transfer_endpoint} is gone (no prefill worker serves it): {exc}"
            ) from exc
        if self.ssl_context is not None:  # no host name on a Unix socket: the certificates' own
            return secure.connect(sock, self.ssl_context, "localhost", handle.transfer_endpoint)
        return sock

    def _exchange(
        self, sock: socket.socket, name: str, handle: KVHandle, dst_block_ids: list[int], deadline: float
    ) -> None:
        with self._lock:
            mapped = self._maps.get(name)
        wire.send_frame(
            sock, wire.hello(handle.handle_id, self.layout, handle.secret, mapped=mapped and mapped.segment)
        )
        reply = wire.recv_frame(sock, deadline)
        if not reply.get("ok"):
            raise wire.refused(handle, reply)
        src_ids = reply["block_ids"]
        wire.check_count(handle, {"num_blocks": len(src_ids)}, dst_block_ids)
        if reply.get("block_nbytes") != self.layout.block_nbytes:
            raise TransferError(
                f"block size {reply.get('block_nbytes')} B at the peer, {self.layout.block_nbytes} B here"
            )
        if mapped is None or mapped.segment != reply["segment"]:
            mapped = self._map_segment(sock, name, reply)
        for src, dst, count in wire.paired_runs(src_ids, dst_block_ids):
            self.pool[dst : dst + count].copy_(mapped.pool[src : src + count])
        wire.send_frame(sock, {"op": "done"})
        if not wire.recv_frame(sock, deadline).get("ok"):
            raise TransferError(
                f"{handle.handle_id} was withdrawn at {handle.transfer_endpoint} during the copy"
            )

    def _map_segment(self, sock: socket.socket, name: str, reply: dict) -> _Mapping:
        with secure.raw(sock) as plain:
            _, fds, _, _ = socket.recv_fds(plain, 1, 1)
        if len(fds) != 1:
            raise ProtocolError("the server did not pass its segment")
        mapping = _Mapping(reply["segment"], fds[0], reply["pool_blocks"], self.layout)
        with self._lock:
            self._maps[name] = mapping
        return mapping
