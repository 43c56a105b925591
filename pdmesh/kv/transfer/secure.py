"""Mutual TLS on the KV transfer's sockets: the ``tcp`` data connection and the control channels of
``shm``, ``device``, ``cuda_ipc`` and ``mooncake``.

A worker with TLS on (``tls_cert`` set) hands its transfer servers a server context and its pullers
a client context, both from its own ``TlsFiles`` (``pdmesh.security.tls``: TLS 1.3 at least, the
peer must present a certificate from the CA, CRL checked when given). On top of the CA check a
server admits only the ``worker`` identity (the certificate's CN): a coordinator's or admin's
certificate from the same CA is refused with a frame naming the identity, which the puller reports.
The puller checks the server is a ``worker`` too.

Mismatched ends fail at once and say why: a TLS server answers a plaintext hello (its first byte is
not a TLS handshake record) with a plaintext refusal frame; a plaintext server refuses a TLS
ClientHello as soon as it reads one (``wire.recv_frame``) and the puller reports the failed
handshake as "the server may run without TLS". Every pull also presents its handle's secret
(``wire.ExposedTable``); a worker with ``kv_transfer_security: secret`` relies on that alone and
sends the KV in clear (``worker_contexts``), for TLS's throughput cost (docs/security.md).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Iterator

from pdmesh.kv.transfer.errors import TransferError
from pdmesh.security.tls import SslContextCache, TlsFiles, files_from, ssl_peer_identity

log = logging.getLogger(__name__)

PULLER_IDENTITY = "worker"  # the only identity that may pull KV (and serve it)
TLS_HANDSHAKE_RECORD = 0x16
ALERT_LINGER_S = 1.0  # how long a refused peer gets to read the alert before the connection closes
# A server or client context, or a cache that rebuilds one when the files rotate.
TlsContext = ssl.SSLContext | SslContextCache

_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust this worker's certificate (another CA?)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused this worker's certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the server refused this worker's certificate: it is revoked",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
    "WRONG_VERSION_NUMBER": "the server does not speak TLS (is TLS off there?)",
    "RECORD_LAYER_FAILURE": "the server does not speak TLS (is TLS off there?)",
}


def contexts(files: TlsFiles | None) -> tuple[SslContextCache | None, SslContextCache | None]:
    """``(server, client)`` contexts for a worker's transfer from its TLS files; ``(None, None)``
    (plaintext) without. Both are rebuilt when the files change, so certificates rotate in place."""
    if files is None:
        return None, None
    return SslContextCache(files, server=True), SslContextCache(files, server=False)


def worker_contexts(config) -> tuple[SslContextCache | None, SslContextCache | None]:
    """A worker's transfer contexts (``contexts``): from its TLS files, or none when its config says
    ``kv_transfer_security: secret`` (the handle secrets alone guard its pulls)."""
    if config.kv_transfer_security == "secret":
        return None, None
    return contexts(files_from(config))


def resolve(context: TlsContext) -> ssl.SSLContext:
    return context.get() if isinstance(context, SslContextCache) else context


def accept(conn: socket.socket, context: TlsContext, timeout_s: float) -> tuple[socket.socket, str | None]:
    """The server's end of a freshly accepted connection: ``(socket, refusal)``.

    ``refusal`` is None for an admitted ``worker`` peer (the socket is then the TLS one); otherwise
    it says why the peer may not pull, to be sent back as a refusal frame on the returned socket
    (plaintext for a plaintext peer). A failed handshake raises ``ssl.SSLError``/``OSError``.
    """
    conn.settimeout(timeout_s)
    first = conn.recv(1, socket.MSG_PEEK)
    if not first:
        raise ConnectionError("the peer closed the connection before saying anything")
    if first[0] != TLS_HANDSHAKE_RECORD:
        return (
            conn,
            "this KV transfer server requires mutual TLS (a worker certificate); the puller spoke plaintext",
        )
    tls = resolve(context).wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except BaseException:
        _close_after_alert(tls)
        raise
    identity = ssl_peer_identity(tls)
    if identity != PULLER_IDENTITY:
        return tls, f"the certificate's identity {identity!r} may not pull KV; only {PULLER_IDENTITY!r} may"
    return tls, None


def _close_after_alert(sock: socket.socket) -> None:
    """Closes a connection whose handshake failed once the peer read our alert: the client's first
    frame may already be here (TLS 1.3 clients send right after their Finished), and closing on
    unread data resets the connection, which would lose the alert that says why."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)  # the alert is out; the TLS layer is done with the socket
        deadline = time.monotonic() + ALERT_LINGER_S
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if not sock.recv(65536):
                break  # the peer read the alert and closed
    sock.close()


def connect(
    sock: socket.socket, context: TlsContext, server_hostname: str, endpoint: str, bulk: bool = False
) -> socket.socket:
    """Wraps a connected puller socket in TLS (the handshake within the socket's timeout) and checks
    that the server is a ``worker``; ``TransferError`` naming the cause otherwise (``sock`` closed).

    ``bulk`` (``tcp``'s data connection) gives a ``BulkTlsSocket``: the same TLS, received in large
    reads; otherwise an ``ssl.SSLSocket`` (which never reads past the record it needs, so ``shm``
    can pass a descriptor between records)."""
    if bulk:
        tls = BulkTlsSocket(sock, resolve(context), server_hostname)
    else:
        tls = resolve(context).wrap_socket(
            sock, server_hostname=server_hostname, do_handshake_on_connect=False
        )
    try:
        tls.do_handshake()
    except ssl.SSLCertVerificationError as exc:
        tls.close()
        raise TransferError(
            f"TLS handshake with {endpoint} failed: its certificate is not trusted here ({exc.verify_message})"
        ) from exc
    except (ssl.SSLError, ConnectionError) as exc:
        tls.close()
        raise TransferError(
            f"TLS handshake with {endpoint} failed: {describe(exc)} "
            "(the server may run without TLS, or not trust this worker's CA)"
        ) from exc
    except BaseException:
        tls.close()
        raise
    identity = ssl_peer_identity(tls)
    if identity != PULLER_IDENTITY:
        tls.close()
        raise TransferError(
            f"{endpoint} presented identity {identity!r}, not a {PULLER_IDENTITY!r} certificate"
        )
    return tls


class BulkTlsSocket:
    """The client end of a TLS connection whose records are read from the socket in large chunks
    into a memory BIO and decrypted from there straight into the caller's buffer.

    An ``ssl.SSLSocket`` makes two ``recv`` calls per 16 KiB record (its header, then its body),
    each a wake-up while the sender is slower: measured on the 2-core dev machine, that cost the
    puller a third more CPU than this (``pdmesh bench transfer --tls``). Only what ``tcp`` and
    ``wire`` use of a socket is here.
    """

    READ_CHUNK = 1 << 20

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str) -> None:
        self._sock = sock
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
        self._chunk = memoryview(bytearray(self.READ_CHUNK))

    def do_handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError(
                        "the server closed the connection during the TLS handshake"
                    ) from None
            else:
                self._flush()
                return

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self._sock.sendall(data)

    def _fill(self) -> bool:
        """Moves what the socket has (waiting within its timeout) into the BIO; False at EOF."""
        n = self._sock.recv_into(self._chunk)
        if n:
            self._incoming.write(self._chunk[:n])
        return n > 0

    def recv_into(self, buffer) -> int:
        """Fills ``buffer`` with every whole record already received (at least one byte, waiting for
        the socket within its timeout only when none is); 0 once the server closed the connection.
        Many records per call keep the caller's per-call costs (``wire.recv_exact``'s deadline
        check) per chunk rather than per 16 KiB record."""
        view = memoryview(buffer).cast("B")
        got = 0
        while got < len(view):
            try:
                got += self._tls.read(len(view) - got, view[got:])
            except ssl.SSLWantReadError:
                if got:
                    return got
                if not self._fill():
                    return 0
            except ssl.SSLZeroReturnError:
                return got
        return got

    def sendall(self, data) -> None:
        self._tls.write(data)
        self._flush()

    def getpeercert(self) -> dict:
        return self._tls.getpeercert()

    def settimeout(self, value: float | None) -> None:
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def setsockopt(self, *args) -> None:
        self._sock.setsockopt(*args)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


def dial(
    address: tuple[str, int], timeout_s: float, context: TlsContext | None, endpoint: str
) -> socket.socket:
    """A TCP connection to a transfer server with ``TCP_NODELAY``, under TLS when ``context`` is set."""
    sock = socket.create_connection(address, timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock if context is None else connect(sock, context, address[0], endpoint)


def describe(exc: BaseException) -> str:
    """A TLS failure in words (the alert or reason OpenSSL gave, explained where we know it)."""
    reason = getattr(exc, "reason", None)
    if reason in _ALERTS:
        return f"{_ALERTS[reason]} [{reason}]"
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def raw(sock: socket.socket) -> Iterator[socket.socket]:
    """The plain socket under ``sock`` (itself when not TLS), for ``SCM_RIGHTS`` which TLS cannot
    carry: a byte sent on it must fall between two whole TLS records on both sides."""
    if not isinstance(sock, ssl.SSLSocket):
        yield sock
        return
    plain = socket.socket(sock.family, sock.type, fileno=sock.fileno())
    try:
        plain.settimeout(sock.gettimeout())
        yield plain
    finally:
        plain.detach()  # the TLS socket still owns the descriptor
