"""The leader's control channel to its followers: steps, KV exposure and pulls, and liveness.

One TCP connection per follower, opened by the follower once its model and KV pool are ready (the
leader's address is in the instance's rendezvous store). Messages are length-prefixed JSON, never
pickles: ``{"op": "step" | "expose" | "withdraw" | "pull" | "stop", ...}`` from the leader;
followers answer only what the leader waits for (``{"op": "ack", "id": n, "ok": ..., "error": ...}``
for an expose or a pull) and send nothing about steps, whose results travel in the collectives.
A follower's first message is its hello (rank, transfer endpoint, pool size) with the instance's
token, which keeps two instances on one host from crossing wires.

The leader reads every connection on a thread of its own: a follower that dies closes its
connection, and the leader learns it at once, idle or not (``on_lost``), rather than at the next
collective.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
MAX_MESSAGE_BYTES = 256 << 20
ACCEPT_POLL_S = 0.2


class ControlError(ConnectionError):
    """The control channel failed: a follower is gone or broke the protocol."""


def send_msg(sock: socket.socket, message: dict) -> None:
    send_raw(sock, json.dumps(message, separators=(",", ":")).encode())


def send_raw(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv_msg(sock: socket.socket) -> dict:
    """The next message; ``ControlError`` when the peer closed the connection or sent garbage."""
    (length,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if length > MAX_MESSAGE_BYTES:
        raise ControlError(f"control message of {length} bytes is over {MAX_MESSAGE_BYTES}")
    try:
        return json.loads(_recv_exact(sock, length))
    except ValueError as exc:
        raise ControlError(f"bad control message: {exc}") from exc


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        read = sock.recv_into(view[got:])
        if read == 0:
            raise ControlError("the peer closed the control connection")
        got += read
    return bytes(buf)


class ControlHub:
    """Leader side: accepts the followers' connections, sends them messages, collects their acks."""

    def __init__(self, host: str, token: str, expected: list[int]) -> None:
        self.token = token
        self.expected = set(expected)
        self._listener = socket.create_server((host, 0), backlog=len(expected) + 8)
        self.port = self._listener.getsockname()[1]
        self._conns: dict[int, socket.socket] = {}
        self._send_locks: dict[int, threading.Lock] = {}
        self.hellos: dict[int, dict] = {}
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        self.on_lost: Callable[[int, str], None] | None = None

    def accept_all(
        self, timeout_s: float, failed: Callable[[], str | None] = lambda: None
    ) -> dict[int, dict]:
        """Waits for every expected follower's hello (giving up early when ``failed()`` names a
        reason, e.g. a rank that exited); their hellos by rank."""
        deadline = time.monotonic() + timeout_s
        self._listener.settimeout(ACCEPT_POLL_S)
        while set(self.hellos) != self.expected:
            why = failed()
            if why is not None:
                raise ControlError(f"the instance cannot start: {why}")
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                if time.monotonic() > deadline:
                    missing = sorted(self.expected - set(self.hellos))
                    raise ControlError(
                        f"followers {missing} did not connect within {timeout_s:.0f}s"
                    ) from None
                continue
            conn.settimeout(timeout_s)
            hello = recv_msg(conn)
            rank = hello.get("rank")
            if hello.get("token") != self.token or rank not in self.expected or rank in self.hellos:
                log.warning(
                    "refused a control connection from %s: %s", peer, {k: hello.get(k) for k in ("rank",)}
                )
                conn.close()
                continue
            conn.settimeout(None)  # the reader waits for acks as long as it takes ...
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # ... but a send to a follower that stopped reading fails after the timeout
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout_s))
            self._conns[rank], self._send_locks[rank], self.hellos[rank] = conn, threading.Lock(), hello
            threading.Thread(
                target=self._read, args=(rank, conn), name=f"control-r{rank}", daemon=True
            ).start()
        self._listener.close()
        return dict(self.hellos)

    def _read(self, rank: int, conn: socket.socket) -> None:
        try:
            while True:
                message = recv_msg(conn)
                if message.get("op") == "ack":
                    self._resolve(message)
        except (ControlError, OSError) as exc:
            if not self._closed:
                self._lost(rank, f"follower rank {rank} is gone: {exc}")

    def _resolve(self, message: dict) -> None:
        with self._lock:
            future = self._pending.pop(message.get("id"), None)
        if future is not None and not future.done():
            future.set_result(message)

    def _lost(self, rank: int, why: str) -> None:
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for future in pending:
            if not future.done():
                future.set_exception(ControlError(why))
        if self.on_lost is not None:
            self.on_lost(rank, why)

    def send(self, rank: int, message: dict | bytes) -> None:
        """Sends to one follower (bytes: an already encoded message); ``ControlError`` if it is gone."""
        data = message if isinstance(message, bytes) else json.dumps(message, separators=(",", ":")).encode()
        try:
            with self._send_locks[rank]:
                send_raw(self._conns[rank], data)
        except OSError as exc:
            raise ControlError(f"follower rank {rank} is gone: {exc}") from exc

    def request(self, rank: int, message: dict) -> Future:
        """Sends ``message`` with a fresh id; the future gets the follower's ack."""
        future: Future = Future()
        with self._lock:
            message = {**message, "id": next(self._ids)}
            self._pending[message["id"]] = future
        try:
            self.send(rank, message)
        except ControlError as exc:
            with self._lock:
                self._pending.pop(message["id"], None)
            future.set_exception(exc)
        return future

    def close(self) -> None:
        """Tells every follower to stop and closes the connections."""
        self._closed = True
        for rank, conn in list(self._conns.items()):
            try:
                with self._send_locks[rank]:
                    send_msg(conn, {"op": "stop"})
            except OSError:
                pass
            conn.close()
        self._listener.close()


class ControlLink:
    """Follower side: the connection to the leader."""

    def __init__(self, address: tuple[str, int], hello: dict, timeout_s: float) -> None:
        self.sock = socket.create_connection(address, timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_msg(self.sock, hello)
        self.sock.settimeout(None)
        self._send_lock = threading.Lock()

    def recv(self) -> dict:
        return recv_msg(self.sock)

    def ack(self, request_id: int, error: str | None = None) -> None:
        with self._send_lock:
            send_msg(self.sock, {"op": "ack", "id": request_id, "ok": error is None, "error": error})

    def close(self) -> None:
        self.sock.close()
