"""The ``mooncake`` transfer backend: the Mooncake Transfer Engine reads the blocks (its TCP transport here).

Needs the ``mooncake-transfer-engine-non-cuda`` wheel (``from mooncake.engine import TransferEngine``;
on Debian its engine needs ``libibverbs1``). Each process runs one engine, started on first use in
``P2PHANDSHAKE`` mode (no etcd or metadata server: peers exchange segment descriptors through the
engine's own RPC port) with protocol ``tcp``; every CPU pool a server or client of this process uses
is registered with it once (reference counted, so a mixed worker registers its pool once).

Wire protocol (one pull per control connection, control frames as in ``wire``; endpoint
``mooncake://host:port``, the control port):

1. client -> server: the hello ``{"v": 1, "op": "pull", "handle_id": ..., "layout": ...}``
2. server -> client: ``{"ok": true, "session": "HOST:RPC_PORT", "base": ADDR, "pool_blocks": P,
   "block_nbytes": B, "block_ids": [...]}`` or ``{"ok": false, "error": ...}``: the engine session
   id and the address of the registered pool, so block ``i`` lives at ``ADDR + i * B``.
3. the client READs every run of consecutive source and destination ids straight into its own
   registered pool with one ``batch_transfer_sync_read`` (one entry per run).
4. client -> server ``{"op": "done"}``; server -> client ``{"ok": true}`` only while the handle is
   still exposed as it was at step 2 (a withdrawn handle or a server gone fails the pull).

Bounds: the control exchange is bounded by the pull's ``timeout_s``; the engine's read by its own
liveness timeout ``MC_TCP_PROGRESS_TIMEOUT_SEC`` (set here to ``ENGINE_PROGRESS_TIMEOUT_S`` unless
already set: no progress for that long fails the read). A peer that dies closes its sockets, which
fails the read at once. The engine reads whatever registered memory it is asked for: only the
control exchange, not the engine, limits a client to the blocks of an exposed handle.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref

import torch
from mooncake.engine import TransferEngine

from pdmesh.kv.transfer import secure, wire
from pdmesh.kv.transfer.errors import ProtocolError, TransferError
from pdmesh.kv.transfer.protocols import check_pool
from pdmesh.kv.transfer.tcp import advertised_host
from pdmesh.kv.types import KVHandle, KVLayout

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 10.0
ENGINE_PROGRESS_TIMEOUT_S = 10
os.environ.setdefault("MC_TCP_PROGRESS_TIMEOUT_SEC", str(ENGINE_PROGRESS_TIMEOUT_S))


class _Engine:
    """The process's Mooncake engine and the reference-counted registrations of its pools."""

    def __init__(self, hostname: str) -> None:
        self.engine = TransferEngine()
        rc = self.engine.initialize(hostname, "P2PHANDSHAKE", "tcp", "")
        if rc != 0:
            raise RuntimeError(
                f"Mooncake TransferEngine.initialize({hostname!r}, P2PHANDSHAKE, tcp) returned {rc}"
            )
        self.session = f"{hostname}:{self.engine.get_rpc_port()}"
        self._lock = threading.Lock()
        self._registered: dict[int, tuple[int, int]] = {}  # address -> (nbytes, references)

    def register(self, pool: torch.Tensor) -> int:
        """Registers ``pool``'s memory (once per address) and returns its address."""
        address, nbytes = pool.data_ptr(), pool.numel() * pool.element_size()
        with self._lock:
            size, refs = self._registered.get(address, (nbytes, 0))
            if refs == 0:
                rc = self.engine.register_memory(address, nbytes)
                if rc != 0:
                    raise RuntimeError(
                        f"Mooncake register_memory of {nbytes} B at {address:#x} returned {rc}"
                    )
            elif size != nbytes:
                raise ValueError(f"memory at {address:#x} is registered with {size} B, not {nbytes} B")
            self._registered[address] = (nbytes, refs + 1)
        return address

    def unregister(self, address: int) -> None:
        with self._lock:
            nbytes, refs = self._registered.get(address, (0, 0))
            if refs > 1:
                self._registered[address] = (nbytes, refs - 1)
                return
            if refs == 1:
                del self._registered[address]
                self.engine.unregister_memory(address)


_ENGINE: _Engine | None = None
_ENGINE_LOCK = threading.Lock()


def engine(hostname: str | None = None) -> _Engine:
    """The process's engine, started on first use with ``$PDMESH_MOONCAKE_HOSTNAME``, ``hostname`` or
    this host's address (the address peers reach its transport at)."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            name = os.environ.get("PDMESH_MOONCAKE_HOSTNAME") or hostname or advertised_host("")
            _ENGINE = _Engine(name)
            log.info("Mooncake transfer engine up, session %s", _ENGINE.session)
        return _ENGINE


def _cpu_only(kv_pool: torch.Tensor) -> None:
    if kv_pool.device.type != "cpu":
        raise ValueError(
            f"the mooncake backend (non-CUDA wheel, tcp transport) serves CPU pools only, not {kv_pool.device}"
        )


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``mooncake://host:port`` -> ``(host, port)``."""
    scheme, sep, rest = endpoint.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme != "mooncake" or not sep or not colon or not port.isdigit():
        raise TransferError(f"not a mooncake transfer endpoint: {endpoint!r}")
    return host.strip("[]"), int(port)


def before_ack() -> None:
    """Runs on the server between the client's read and the acknowledgement (tests slow it down)."""


class MooncakeTransferServer(wire.ExposingServer):
    """Prefill side of ``mooncake``: registers the pool with the engine, tells pullers where blocks are."""

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
        _cpu_only(kv_pool)
        self.layout = layout
        self.host = host
        self.port = port
        self._pool = kv_pool
        self._exposed = wire.ExposedTable(kv_pool.shape[0])
        self._control: wire.ControlServer | None = None
        self._engine: _Engine | None = None
        self._base = 0

    @property
    def endpoint(self) -> str:
        return f"mooncake://{advertised_host(self.host)}:{self.port}"

    def start(self) -> None:
        """Registers the pool, binds the control socket (port 0: a free port) and starts serving."""
        if self._control is not None:
            return
        self._engine = engine(advertised_host(self.host))
        self._base = self._engine.register(self._pool)
        listener = socket.create_server((self.host, self.port), backlog=128)
        self.port = listener.getsockname()[1]
        self._control = wire.ControlServer(
            listener, self._serve, f"kv-mooncake-{self.port}", self.ssl_context
        )
        log.info("KV mooncake transfer server on %s (engine session %s)", self.endpoint, self._engine.session)

    def stop(self) -> None:
        """Stops serving and unregisters the pool; idempotent."""
        if self._control is not None:
            self._control.stop()
            self._control = None
            assert self._engine is not None
            self._engine.unregister(self._base)

    def _serve(self, conn: socket.socket, peer) -> None:
        conn.settimeout(wire.HANDSHAKE_TIMEOUT_S)
        hello = wire.recv_frame(conn)
        with wire.pull_span(hello, "mooncake"):
            self._serve_pull(conn, peer, hello)

    def _serve_pull(self, conn: socket.socket, peer, hello: dict) -> None:
        admitted = self._exposed.admit(conn, hello, self.layout, peer)
        if admitted is None:
            return
        block_ids, token = admitted
        assert self._engine is not None
        reply = {
            "ok": True,
            "session": self._engine.session,
            "base": self._base,
            "pool_blocks": self._pool.shape[0],
            "block_nbytes": self.layout.block_nbytes,
            "block_ids": list(block_ids),
        }
        wire.send_frame(conn, reply)
        conn.settimeout(ACK_TIMEOUT_S + ENGINE_PROGRESS_TIMEOUT_S + wire.HANDSHAKE_TIMEOUT_S)
        done = wire.recv_frame(conn)
        before_ack()
        still = done.get("op") == "done" and self._exposed.still(hello["handle_id"], token)
        wire.send_frame(conn, {"ok": still})
        if still:  # the peer's engine read the blocks out of this pool itself
            self._served(len(block_ids), self.layout.block_nbytes)


def read_runs(
    eng: _Engine, session: str, runs: list[tuple[int, int, int]], local: int, remote: int, block_nbytes: int
) -> int:
    """Reads each ``(src, dst, count)`` run with one batched engine call; the engine's return code."""
    return eng.engine.batch_transfer_sync_read(
        session,
        [local + dst * block_nbytes for _, dst, _ in runs],
        [remote + src * block_nbytes for src, _, _ in runs],
        [count * block_nbytes for _, _, count in runs],
    )


class MooncakeTransferClient:
    """Decode side of ``mooncake``: the engine reads a handle's blocks into the destination blocks.

    Thread-safe: each pull has its own control connection; the engine serves concurrent reads.
    """

    def __init__(
        self, kv_pool: torch.Tensor, layout: KVLayout, ssl_context: secure.TlsContext | None = None
    ) -> None:
        check_pool(kv_pool, layout)
        self.ssl_context = ssl_context
        _cpu_only(kv_pool)
        self.layout = layout
        self.pool = kv_pool
        self._engine = engine()
        self._base = self._engine.register(kv_pool)
        self._finalizer = weakref.finalize(self, self._engine.unregister, self._base)

    def pull(self, handle: KVHandle, dst_block_ids: list[int], timeout_s: float) -> None:
        """Reads every block of ``handle`` into ``dst_block_ids`` (same count) or raises ``TransferError``."""
        wire.check_preconditions(self.layout, handle, dst_block_ids, self.pool.shape[0])
        address = parse_endpoint(handle.transfer_endpoint)
        deadline = time.monotonic() + timeout_s
        with wire.pull_errors(handle, timeout_s):
            connect_s = min(wire.CONNECT_TIMEOUT_S, timeout_s)
            with secure.dial(address, connect_s, self.ssl_context, handle.transfer_endpoint) as sock:
                self._exchange(sock, handle, list(dst_block_ids), deadline)

    def _exchange(
        self, sock: socket.socket, handle: KVHandle, dst_block_ids: list[int], deadline: float
    ) -> None:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        wire.send_frame(sock, wire.hello(handle.handle_id, self.layout, handle.secret))
        reply = wire.recv_frame(sock, deadline)
        if not reply.get("ok"):
            raise wire.refused(handle, reply)
        src_ids = reply["block_ids"]
        wire.check_count(handle, {"num_blocks": len(src_ids)}, dst_block_ids)
        if reply.get("block_nbytes") != self.layout.block_nbytes:
            raise TransferError(
                f"block size {reply.get('block_nbytes')} B at the peer, {self.layout.block_nbytes} B here"
            )
        if any(not 0 <= b < reply["pool_blocks"] for b in src_ids):
            raise ProtocolError(f"source block ids out of the peer's {reply['pool_blocks']} blocks")
        runs = wire.paired_runs(src_ids, dst_block_ids)
        started = time.monotonic()
        rc = read_runs(
            self._engine, reply["session"], runs, self._base, reply["base"], self.layout.block_nbytes
        )
        if rc != 0:
            raise TransferError(
                f"Mooncake read of {handle.handle_id} from {reply['session']} "
                f"({handle.transfer_endpoint}) failed with {rc}"
            )
        log.debug("read %s: %d runs in %.3fs", handle.handle_id, len(runs), time.monotonic() - started)
        wire.send_frame(sock, {"op": "done"})
        if not wire.recv_frame(sock, max(deadline, time.monotonic() + ACK_TIMEOUT_S)).get("ok"):
            raise TransferError(
                f"{handle.handle_id} was withdrawn at {handle.transfer_endpoint} during the read"
            )

    def close(self) -> None:
        """Unregisters the pool from the engine."""
        self._finalizer()
