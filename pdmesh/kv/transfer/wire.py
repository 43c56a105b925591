"""What every transfer backend shares: JSON control frames, block runs, the exposed-handle table and
a threaded control server.

A control frame is a 4-byte big-endian length then UTF-8 JSON. Every backend opens a pull with the
same hello, ``{"v": 1, "op": "pull", "handle_id": ..., "layout": KVLayout.to_dict()}``; the server
checks the layout (naming the first field that differs) and that the handle is exposed before any
block moves. Only the way the bytes then travel differs (see each backend's module docstring).
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import json
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator

from pdmesh.kv.transfer import secure
from pdmesh.kv.transfer.errors import ProtocolError, Refused, TransferError
from pdmesh.kv.types import KVHandle, KVLayout
from pdmesh.observability import tracing

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20
HANDSHAKE_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
_FRAME = struct.Struct("!I")


def send_frame(sock: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    sock.sendall(_FRAME.pack(len(data)) + data)


def recv_exact(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fills ``view`` from the socket in as few ``recv_into`` calls as the kernel allows.

    The socket timeout is set once per call (each timed ``recv_into`` also costs a ``poll``), not
    per chunk; EOF or the deadline passing raise.
    """
    got, total = 0, len(view)
    while got < total:
        if deadline is not None:
            _bound_timeout(sock, deadline, total - got, total)
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(
                f"peer closed the connection with {total - got} of {total} bytes outstanding"
            )
        got += n


def _bound_timeout(sock: socket.socket, deadline: float, outstanding: int, total: int) -> None:
    """Lowers the socket timeout to what is left before ``deadline`` (no syscall while it still fits)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"deadline passed with {outstanding} of {total} bytes outstanding")
    current = sock.gettimeout()
    if current is None or current > remaining:
        sock.settimeout(remaining)


def recv_frame(sock: socket.socket, deadline: float | None = None) -> dict:
    header = bytearray(_FRAME.size)
    recv_exact(sock, memoryview(header), deadline)
    (length,) = _FRAME.unpack(header)
    if header[0] == secure.TLS_HANDSHAKE_RECORD and header[1] == 3:  # no frame is that long
        raise ProtocolError("the peer opened a TLS handshake; this KV transfer server runs without TLS")
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {length} bytes is larger than {MAX_FRAME_BYTES}")
    body = bytearray(length)
    recv_exact(sock, memoryview(body), deadline)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"bad frame: {exc}") from exc


def block_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """``(start, count)`` runs of consecutive ids, in order: ``[4, 5, 6, 9]`` -> ``[(4, 3), (9, 1)]``."""
    runs: list[tuple[int, int]] = []
    for block in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs


def paired_runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """``(src_start, dst_start, count)`` stretches where both id lists run consecutively."""
    runs: list[tuple[int, int, int]] = []
    for src, dst in zip(src_ids, dst_ids, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((src, dst, 1))
    return runs


def check_ids(block_ids: list[int], num_blocks: int, what: str) -> None:
    bad = [b for b in block_ids if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"{what} block ids out of range [0, {num_blocks}): {bad[:8]}")


def hello(handle_id: str, layout: KVLayout, secret: str = "", **extra) -> dict:
    """The opening frame of a pull, with the handle's ``secret`` when it has one; while tracing is on
    it carries the puller's trace context (``"trace": {"traceparent": ...}``), the parent of the
    server's span of the pull."""
    message = {"v": PROTOCOL_VERSION, "op": "pull", "handle_id": handle_id, "layout": layout.to_dict()}
    if secret:
        message["secret"] = secret
    message.update(extra)
    carrier = tracing.inject({})
    if carrier:
        message["trace"] = carrier
    return message


def pull_span(hello: dict, backend: str):
    """The server's span of one pull (``kv.transfer.send``), a child of the puller's span."""
    attributes = {"pdmesh.kv.backend": backend, "pdmesh.kv.handle_id": str(hello.get("handle_id"))}
    return tracing.remote_span("kv.transfer.send", hello.get("trace"), attributes)


class ExposedTable:
    """Handles a server serves, each with a token that changes whenever the handle is re-exposed.

    A handle exposed with a secret is served only to a pull that presents it (compared in constant
    time): the prefill worker draws one per handle and publishes it only in the registry, so only a
    peer that may read the registry can pull, with or without TLS on the socket.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._lock = threading.Lock()
        self._table: dict[str, tuple[tuple[int, ...], int]] = {}
        self._secrets: dict[str, bytes] = {}
        self._tokens = itertools.count(1)

    def expose(self, handle_id: str, block_ids: list[int], secret: str = "") -> None:
        check_ids(list(block_ids), self.num_blocks, "exposed")
        with self._lock:
            self._table[handle_id] = (tuple(block_ids), next(self._tokens))
            if secret:
                self._secrets[handle_id] = secret.encode()
            else:
                self._secrets.pop(handle_id, None)

    def withdraw(self, handle_id: str) -> None:
        with self._lock:
            self._table.pop(handle_id, None)
            self._secrets.pop(handle_id, None)

    def _secret_refusal(self, handle_id: str, message: dict) -> str | None:
        with self._lock:
            expected = self._secrets.get(handle_id)
        if expected is None:
            return None
        presented = message.get("secret")
        if not isinstance(presented, str) or not presented:
            return f"the pull of KV handle {handle_id!r} presented no secret (a puller reads it from the registry)"
        if not hmac.compare_digest(presented.encode(), expected):
            return f"wrong secret for KV handle {handle_id!r}"
        return None

    def get(self, handle_id: str) -> tuple[tuple[int, ...], int] | None:
        with self._lock:
            return self._table.get(handle_id)

    def still(self, handle_id: str, token: int) -> bool:
        """True while ``handle_id`` is exposed as it was when ``token`` was handed out."""
        entry = self.get(handle_id)
        return entry is not None and entry[1] == token

    def check_hello(self, message: dict, layout: KVLayout) -> tuple[tuple[int, ...], int, str | None]:
        """``(block_ids, token, None)`` for a valid pull, else ``((), 0, reason)``."""
        if message.get("v") != PROTOCOL_VERSION or message.get("op") != "pull":
            return (
                (),
                0,
                (
                    f"unsupported request (protocol v{message.get('v')}, op {message.get('op')!r}); "
                    f"this server speaks v{PROTOCOL_VERSION} pull"
                ),
            )
        try:
            theirs = KVLayout.from_dict(message["layout"])
        except (KeyError, TypeError) as exc:
            return (), 0, f"malformed KV layout in request: {exc}"
        mismatch = layout.mismatch(theirs)
        if mismatch:
            return (), 0, mismatch
        handle_id = message.get("handle_id")
        entry = self.get(handle_id)
        if entry is None:
            return (
                (),
                0,
                (f"KV handle {handle_id!r} is not exposed here (released, expired or never prefilled here)"),
            )
        refusal = self._secret_refusal(handle_id, message)
        if refusal:
            return (), 0, refusal
        return entry[0], entry[1], None

    def admit(
        self, conn: socket.socket, message: dict, layout: KVLayout, peer
    ) -> tuple[tuple[int, ...], int] | None:
        """``(block_ids, token)`` for a valid pull; else the refusal is sent (and logged): None."""
        block_ids, token, error = self.check_hello(message, layout)
        if error is None:
            return block_ids, token
        log.warning("refused KV pull of %s from %s: %s", message.get("handle_id"), peer, error)
        send_frame(conn, {"ok": False, "error": error})
        return None


class ExposingServer:
    """``expose``/``withdraw`` of a transfer server over its ``ExposedTable`` (``self._exposed``).

    ``on_served`` (set by the worker) hears the bytes of every pull served to the end, whatever the
    backend: the prefill side's count of what it sent.
    """

    _exposed: ExposedTable
    on_served: Callable[[int], None] | None = None

    def _served(self, num_blocks: int, block_nbytes: int) -> None:
        tracing.current_span().set_attribute("pdmesh.kv.bytes", num_blocks * block_nbytes)
        if self.on_served is not None:
            try:
                self.on_served(num_blocks * block_nbytes)
            except Exception:  # noqa: BLE001 - counting must never fail a pull
                log.exception("on_served failed")

    def expose(self, handle_id: str, block_ids: list[int], secret: str = "") -> None:
        """Lets peers pull these blocks as ``handle_id`` until ``withdraw`` (only those presenting
        ``secret``, when given)."""
        self._exposed.expose(handle_id, block_ids, secret)

    def withdraw(self, handle_id: str) -> None:
        self._exposed.withdraw(handle_id)


class ControlServer:
    """Accepts connections on a listening socket and serves each in its own daemon thread.

    With ``ssl_context`` every connection must pass ``secure.accept`` (mutual TLS, a ``worker``
    certificate) before the handler sees it; a refused peer gets one refusal frame.
    """

    def __init__(
        self,
        listener: socket.socket,
        handler: Callable[[socket.socket, object], None],
        name: str,
        ssl_context: secure.TlsContext | None = None,
    ):
        self.listener = listener
        self._handler = handler
        self._name = name
        self._ssl = ssl_context
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self.stopping.is_set():
                    log.exception("%s accept failed", self._name)
                return
            conn.settimeout(None)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, peer), name=self._name, daemon=True).start()

    def _serve(self, conn: socket.socket, peer) -> None:
        try:
            if self._ssl is not None:
                conn, refusal = self._secure(conn)
                if refusal is not None:
                    self._refuse(conn, peer, refusal)
                    return
            self._handler(conn, peer)
        except (OSError, ProtocolError) as exc:
            if not self.stopping.is_set():
                log.warning("%s: connection from %s failed: %s", self._name, peer, exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _secure(self, conn: socket.socket) -> tuple[socket.socket, str | None]:
        """``secure.accept``, keeping the set of live connections on the socket that owns the
        descriptor (the TLS one once it took over)."""
        secured, refusal = secure.accept(conn, self._ssl, HANDSHAKE_TIMEOUT_S)
        with self._lock:
            self._conns.discard(conn)
            self._conns.add(secured)
        return secured, refusal

    def _refuse(self, conn: socket.socket, peer, refusal: str) -> None:
        """Answers the peer's opening frame with the refusal (closing on unread data would reset
        the connection before the peer read why)."""
        log.warning("%s: refused %s: %s", self._name, peer, refusal)
        recv_frame(conn, time.monotonic() + HANDSHAKE_TIMEOUT_S)
        send_frame(conn, {"ok": False, "error": refusal})

    def stop(self) -> None:
        """Stops accepting and drops every connection in flight."""
        self.stopping.set()
        self._thread.join(2.0)
        self.listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def pull_errors(handle: KVHandle, timeout_s: float) -> Iterator[None]:
    """Turns socket, timeout and protocol failures of one pull into ``TransferError``."""
    try:
        yield
    except TransferError:
        raise
    except TimeoutError as exc:
        raise TransferError(
            f"pull of {handle.handle_id} from {handle.transfer_endpoint} timed out after {timeout_s:.1f}s: {exc}"
        ) from exc
    except ssl.SSLError as exc:  # TLS 1.3: a refused client certificate shows at the first read
        raise TransferError(
            f"pull of {handle.handle_id} from {handle.transfer_endpoint} failed in TLS: {secure.describe(exc)}"
        ) from exc
    except (OSError, ProtocolError, EOFError) as exc:
        raise TransferError(
            f"pull of {handle.handle_id} from {handle.transfer_endpoint} failed: {exc}"
        ) from exc


def refused(handle: KVHandle, reply: dict) -> TransferError:
    return Refused(f"{handle.transfer_endpoint} refused the pull of {handle.handle_id}: {reply.get('error')}")


def check_preconditions(
    layout: KVLayout, handle: KVHandle, dst_block_ids: list[int], num_blocks: int
) -> None:
    """The checks every client makes before it connects: the handle's layout and the destination ids."""
    mismatch = layout.mismatch(handle.layout)
    if mismatch:
        raise TransferError(mismatch)
    try:
        check_ids(list(dst_block_ids), num_blocks, "destination")
    except ValueError as exc:
        raise TransferError(str(exc)) from exc


def check_count(handle: KVHandle, reply: dict, dst_block_ids: list[int]) -> None:
    if reply.get("num_blocks") != len(dst_block_ids):
        raise TransferError(
            f"{handle.transfer_endpoint} holds {reply.get('num_blocks')} blocks for {handle.handle_id} "
            f"but {len(dst_block_ids)} destination blocks were given"
        )
