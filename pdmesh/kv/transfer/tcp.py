"""The ``tcp`` transfer backend: portable, across hosts, zero copy on both ends for CPU pools.

Wire protocol (control frames as in ``wire``; a connection carries any number of pulls in turn):

1. client -> server: the hello ``{"v": 1, "op": "pull", "handle_id": ..., "layout": ...}``
2. server -> client: ``{"ok": true, "num_blocks": N, "block_nbytes": B}`` or ``{"ok": false, "error": ...}``
3. server -> client: ``N * B`` raw bytes, the handle's blocks in its own order.

The client keeps a connection that served a pull whole for the next pull to the same endpoint (up
to 4 idle per endpoint, reused for 60 s; the server closes one idle for 120 s): a fresh connection
pays the connect and TCP's receive-window ramp-up, which cost a 16 MiB pull about a third of its
time. A reused connection that turns out closed before the reply is retried once on a new one.

The server reads only the blocks it pinned for an exposed handle (never a list from the client),
after checking that both layouts match. Runs of consecutive block ids go out as one ``sendall`` of
a memoryview over the pool; the client ``recv_into``s straight into its destination blocks, one
destination run at a time, with the socket timeout set once per run rather than per chunk. Socket
buffer sizes are left to the kernel: pinning ``SO_RCVBUF`` turns off Linux's receive-window
autotuning and, with ``rmem_max`` at 4 MiB, cost about a third of the loopback throughput. Pools on
an accelerator are staged through host memory one run at a time.

Nearly all of a pull's time is the kernel copying into the destination blocks; ``allocate_pool``
puts CPU pools on huge pages (``hostmem``), which halves that copy's cost. The server keeps its
socket timeout while sending: a blocking ``sendall`` measured slower on loopback.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import torch

from pdmesh.kv.transfer import secure, wire
from pdmesh.kv.transfer.errors import Refused, TransferError
from pdmesh.kv.transfer.protocols import check_pool
from pdmesh.kv.types import KVHandle, KVLayout

log = logging.getLogger(__name__)

SEND_STALL_TIMEOUT_S = 30.0  # server: a peer that reads nothing for this long is dropped
IDLE_TIMEOUT_S = 120.0  # server: an idle connection is closed after this long
CLIENT_IDLE_S = 60.0  # client: an idle connection older than this is not reused
MAX_IDLE_PER_PEER = 4
block_runs = wire.block_runs  # kept importable from here


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``tcp://host:port`` -> ``(host, port)``."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "device"):
        raise TransferError(f"not a tcp transfer endpoint: {endpoint!r}")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise TransferError(f"malformed tcp transfer endpoint: {endpoint!r}")
    return host.strip("[]"), int(port)


def advertised_host(host: str) -> str:
    """The address peers should dial for a server bound to ``host``."""
    if host in ("", "0.0.0.0", "::"):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return host


def send_run(sock: socket.socket, view: memoryview) -> None:
    """Sends one run of blocks (a module function so that tests can slow it down)."""
    sock.sendall(view)


class PoolBytes:
    """Byte views of runs of blocks of a pool: zero copy on CPU, staged through host memory elsewhere."""

    def __init__(self, kv_pool: torch.Tensor, layout: KVLayout) -> None:
        check_pool(kv_pool, layout)
        self.pool = kv_pool
        self.num_blocks = kv_pool.shape[0]
        self.block_nbytes = layout.block_nbytes
        self.on_host = kv_pool.device.type == "cpu"
        self._flat = memoryview(kv_pool.reshape(-1).view(torch.uint8).numpy()) if self.on_host else None

    def read(self, start: int, count: int) -> memoryview:
        if self.on_host:
            return self._flat[start * self.block_nbytes : (start + count) * self.block_nbytes]
        host = self.pool[start : start + count].reshape(-1).view(torch.uint8).cpu()
        return memoryview(host.numpy())

    def receive(self, sock: socket.socket, start: int, count: int, deadline: float) -> None:
        if self.on_host:
            view = self._flat[start * self.block_nbytes : (start + count) * self.block_nbytes]
            wire.recv_exact(sock, view, deadline)
            return
        staging = torch.empty(count * self.block_nbytes, dtype=torch.uint8)
        wire.recv_exact(sock, memoryview(staging.numpy()), deadline)
        self.pool[start : start + count].reshape(-1).view(torch.uint8).copy_(staging)


class TcpTransferServer(wire.ExposingServer):
    """Prefill side of the ``tcp`` backend: a listening socket and a thread per pulling connection."""

    def __init__(
        self,
        kv_pool: torch.Tensor,
        layout: KVLayout,
        host: str,
        port: int = 0,
        ssl_context: secure.TlsContext | None = None,
    ) -> None:
        self.layout = layout
        self.host = host
        self.port = port
        self.ssl_context = ssl_context  # a server context: mutual TLS, workers only (``secure``)
        self._blocks = PoolBytes(kv_pool, layout)
        self._exposed = wire.ExposedTable(self._blocks.num_blocks)
        self._control: wire.ControlServer | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://{advertised_host(self.host)}:{self.port}"

    def start(self) -> None:
        """Binds and starts accepting pulls (port 0: a free port, then ``self.port``)."""
        if self._control is not None:
            return
        listener = socket.create_server((self.host, self.port), backlog=128)
        self.port = listener.getsockname()[1]
        self._control = wire.ControlServer(listener, self._serve, f"kv-tcp-{self.port}", self.ssl_context)
        log.info("KV tcp transfer server on %s%s", self.endpoint, " (TLS)" if self.ssl_context else "")

    def stop(self) -> None:
        """Stops accepting and drops every connection in flight; idempotent."""
        if self._control is not None:
            self._control.stop()
            self._control = None

    def _serve(self, conn: socket.socket, peer) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            conn.settimeout(IDLE_TIMEOUT_S)
            try:
                hello = wire.recv_frame(conn)
            except (ConnectionError, TimeoutError):
                return  # the client closed (or forgot) its idle connection
            conn.settimeout(wire.HANDSHAKE_TIMEOUT_S)
            with wire.pull_span(hello, "tcp"):
                self._serve_pull(conn, peer, hello)

    def _serve_pull(self, conn: socket.socket, peer, hello: dict) -> None:
        admitted = self._exposed.admit(conn, hello, self.layout, peer)
        if admitted is None:
            return
        block_ids, _ = admitted
        reply = {"ok": True, "num_blocks": len(block_ids), "block_nbytes": self._blocks.block_nbytes}
        wire.send_frame(conn, reply)
        conn.settimeout(SEND_STALL_TIMEOUT_S)
        started = time.monotonic()
        for start, count in wire.block_runs(list(block_ids)):
            send_run(conn, self._blocks.read(start, count))
        self._served(len(block_ids), self._blocks.block_nbytes)
        log.debug(
            "served %s: %d bytes in %.3fs to %s",
            hello.get("handle_id"),
            len(block_ids) * self._blocks.block_nbytes,
            time.monotonic() - started,
            peer,
        )


class _Idle:
    """Idle connections per endpoint, so that a pull skips the connect and the TCP window ramp-up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, int], list[tuple[socket.socket, float]]] = {}

    def take(self, address: tuple[str, int]) -> socket.socket | None:
        with self._lock:
            conns = self._idle.get(address, [])
            while conns:
                sock, since = conns.pop()
                if time.monotonic() - since < CLIENT_IDLE_S:
                    return sock
                sock.close()
        return None

    def give(self, address: tuple[str, int], sock: socket.socket) -> None:
        with self._lock:
            conns = self._idle.setdefault(address, [])
            if len(conns) < MAX_IDLE_PER_PEER:
                conns.append((sock, time.monotonic()))
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for sock, _ in conns:
                sock.close()


class TcpTransferClient:
    """Decode side of the ``tcp`` backend: pulls received straight into the destination blocks.

    Thread-safe: concurrent pulls each use their own connection (and the server a thread per
    connection). A connection that served a pull whole is kept for the next pull to that endpoint;
    one that failed in any way is closed.
    """

    def __init__(
        self, kv_pool: torch.Tensor, layout: KVLayout, ssl_context: secure.TlsContext | None = None
    ) -> None:
        self.layout = layout
        self.ssl_context = ssl_context  # a client context: this worker's certificate (``secure``)
        self._blocks = PoolBytes(kv_pool, layout)
        self._idle = _Idle()

    def pull(self, handle: KVHandle, dst_block_ids: list[int], timeout_s: float) -> None:
        """Pulls every block of ``handle`` into ``dst_block_ids`` (same count) or raises ``TransferError``."""
        wire.check_preconditions(self.layout, handle, dst_block_ids, self._blocks.num_blocks)
        address = parse_endpoint(handle.transfer_endpoint)
        deadline = time.monotonic() + timeout_s
        with wire.pull_errors(handle, timeout_s):
            sock = self._idle.take(address)
            if sock is not None:
                try:
                    self._exchange(sock, handle, list(dst_block_ids), deadline)
                except _StaleConnection:
                    sock.close()  # the server dropped it while idle: dial afresh
                else:
                    self._idle.give(address, sock)
                    return
            sock = socket.create_connection(address, timeout=min(wire.CONNECT_TIMEOUT_S, timeout_s))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = secure.connect(sock, self.ssl_context, address[0], handle.transfer_endpoint, bulk=True)
            try:
                self._exchange(sock, handle, list(dst_block_ids), deadline)
            except _StaleConnection as exc:
                raise ConnectionError(str(exc)) from exc
            self._idle.give(address, sock)

    def _exchange(
        self, sock: socket.socket, handle: KVHandle, dst_block_ids: list[int], deadline: float
    ) -> None:
        """One pull on ``sock``; closes it on any failure but a refusal."""
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                wire.send_frame(sock, wire.hello(handle.handle_id, self.layout, handle.secret))
                reply = wire.recv_frame(sock, deadline)
            except ConnectionError as exc:  # nothing arrived: safe to retry on a new connection
                raise _StaleConnection(str(exc)) from exc
            if not reply.get("ok"):
                raise wire.refused(handle, reply)
            wire.check_count(handle, reply, dst_block_ids)
            if reply.get("block_nbytes") != self._blocks.block_nbytes:
                raise TransferError(
                    f"block size {reply.get('block_nbytes')} B at the peer, {self._blocks.block_nbytes} B here"
                )
            for start, count in wire.block_runs(dst_block_ids):
                self._blocks.receive(sock, start, count, deadline)
        except Refused:
            raise
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        """Closes the idle connections."""
        self._idle.close()


class _StaleConnection(Exception):
    pass
