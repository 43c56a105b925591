"""TLS settings of a process: which CA, certificate, key and CRL it uses, the gRPC credentials and
``ssl`` contexts built from them, and the identity of a calling peer.

A service main calls ``configure(TlsFiles(...))`` at startup (or ``configure(None)``: plaintext, the
default); ``pdmesh.rpc.server.start_server`` and ``pdmesh.rpc.client.open_channel`` read
``current()``. Files are re-read when they change (servers check on every new connection), so
certificates, the CA and the CRL rotate without a restart. Key material is never logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

log = logging.getLogger(__name__)

_current: TlsFiles | None = None


class TlsError(ValueError):
    """A TLS file is missing, unreadable, too open or not what it should be (one-line message)."""


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes of one consistent read of a ``TlsFiles``."""

    ca: bytes
    cert: bytes
    key: bytes = b""
    crl: bytes | None = None

    def __repr__(self) -> str:  # never show the key, not even in a traceback's locals
        return f"TlsMaterial(ca={len(self.ca)}B, cert={len(self.cert)}B, key=<hidden>, crl={self.crl is not None})"


@dataclass(frozen=True)
class TlsFiles:
    """Paths of a service's CA bundle, certificate (chain), private key and optional CRL."""

    ca: str
    cert: str
    key: str
    crl: str | None = None

    def paths(self) -> list[str]:
        return [p for p in (self.ca, self.cert, self.key, self.crl) if p]

    def check(self) -> None:
        """Raises ``TlsError`` naming the first missing file or a key readable by others."""
        for path in self.paths():
            if not os.path.isfile(path):
                raise TlsError(f"TLS file {path} does not exist or is not a file")
        mode = stat.S_IMODE(os.stat(self.key).st_mode)
        if mode & 0o077:
            raise TlsError(
                f"TLS key file {self.key} has mode {mode:04o}, looser than 0600; run `chmod 600 {self.key}`"
            )

    def load(self) -> TlsMaterial:
        """Reads the files (after ``check``); raises ``TlsError`` with a one-line message."""
        self.check()
        try:
            material = TlsMaterial(
                ca=Path(self.ca).read_bytes(),
                cert=Path(self.cert).read_bytes(),
                key=Path(self.key).read_bytes(),
                crl=Path(self.crl).read_bytes() if self.crl else None,
            )
        except OSError as exc:
            raise TlsError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
        for name, data in (("CA", material.ca), ("certificate", material.cert)):
            if b"-----BEGIN CERTIFICATE-----" not in data:
                raise TlsError(
                    f"TLS {name} file {self.ca if name == 'CA' else self.cert} holds no PEM certificate"
                )
        if b"PRIVATE KEY-----" not in material.key:
            raise TlsError(f"TLS key file {self.key} holds no PEM private key")
        if material.crl is not None and b"-----BEGIN X509 CRL-----" not in material.crl:
            raise TlsError(f"TLS CRL file {self.crl} holds no PEM CRL")
        return material

    def version(self) -> tuple:
        """Changes whenever one of the files is replaced or rewritten (for reloading)."""
        out = []
        for path in self.paths():
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)


def files_from(config: Any) -> TlsFiles | None:
    """The ``TlsFiles`` of a service config with ``tls_*`` fields; None while ``tls_cert`` is unset."""
    if not getattr(config, "tls_cert", None):
        return None
    return TlsFiles(ca=config.tls_ca, cert=config.tls_cert, key=config.tls_key, crl=config.tls_crl)


def configure(files: TlsFiles | None) -> None:
    """Sets this process's TLS files (None: plaintext); checks them first so a bad file fails
    startup with one line instead of failing every connection later."""
    global _current
    if files is not None:
        files.load()
        log.info(
            "TLS on: CA %s, certificate %s%s", files.ca, files.cert, f", CRL {files.crl}" if files.crl else ""
        )
    _current = files


def current() -> TlsFiles | None:
    """The files set by ``configure`` (None: plaintext)."""
    return _current


# --- gRPC -----------------------------------------------------------------------------------------


def grpc_server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate from the CA and re-read the CA,
    certificate and key when their files change (checked before each new connection's handshake)."""
    files = dataclasses.replace(files, crl=None)  # the identity interceptor checks the CRL
    state = {"version": files.version()}
    initial = _server_cert_config(files.load())

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        version = files.version()
        if version == state["version"]:
            return None
        try:
            config = _server_cert_config(files.load())
        except TlsError as exc:
            # Half-rotated files: keep serving with the previous set until they are whole again.
            log.warning("TLS files changed but cannot be loaded, keeping the previous ones: %s", exc)
            return None
        state["version"] = version
        log.info("TLS files changed: reloaded %s and %s", files.cert, files.ca)
        return config

    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)


def _server_cert_config(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.ca
    )


def grpc_channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Channel credentials presenting ``files``' certificate and trusting its CA (read now)."""
    material = files.load()
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca, private_key=material.key, certificate_chain=material.cert
    )


def peer_identity(context: Any) -> str | None:
    """The subject CN of the calling peer's certificate (a gRPC servicer context); None without one."""
    auth = context.auth_context() or {}
    names = auth.get("x509_common_name") or []
    return names[0].decode() if names else None


def peer_certificate(context: Any) -> bytes | None:
    """The PEM of the calling peer's certificate (a gRPC servicer context); None without one."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    return pems[0] if pems else None


class RevocationList:
    """The serial numbers in a CRL file, re-read when it changes; the CRL must verify under the CA.

    gRPC Python has no CRL option on server credentials (grpcio 1.85), so the identity interceptor
    asks this on every call instead: a revoked certificate is refused even on a connection opened
    before it was revoked.
    """

    def __init__(self, files: TlsFiles) -> None:
        if not files.crl:
            raise ValueError("RevocationList needs TlsFiles with a crl")
        self.files = files
        self._lock = threading.Lock()
        self._version: tuple | None = None
        self._serials: frozenset[int] = frozenset()
        self._reload()

    def _reload(self) -> None:
        full = self.files.version()
        version = (full[0], full[-1])  # the CA and the CRL
        if version == self._version:
            return
        try:
            ca = x509.load_pem_x509_certificate(Path(self.files.ca).read_bytes())
            crl = x509.load_pem_x509_crl(Path(self.files.crl).read_bytes())  # type: ignore[arg-type]
        except (OSError, ValueError) as exc:
            if self._version is None:
                raise TlsError(f"cannot load TLS CRL {self.files.crl}: {exc}") from None
            log.warning(
                "TLS CRL %s changed but cannot be loaded, keeping the previous one: %s", self.files.crl, exc
            )
            return
        if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            if self._version is None:
                raise TlsError(f"TLS CRL {self.files.crl} is not signed by the CA {self.files.ca}")
            log.warning("TLS CRL %s is not signed by the CA, keeping the previous one", self.files.crl)
            return
        self._serials = frozenset(r.serial_number for r in crl)
        self._version = version
        log.info("TLS CRL %s loaded: %d revoked certificates", self.files.crl, len(self._serials))

    def is_revoked(self, cert_pem: bytes) -> bool:
        with self._lock:
            self._reload()
            serials = self._serials
        return _serial_of(cert_pem) in serials


_serials_by_pem: dict[bytes, int] = {}


def _serial_of(cert_pem: bytes) -> int:
    serial = _serials_by_pem.get(cert_pem)
    if serial is None:
        serial = x509.load_pem_x509_certificate(cert_pem).serial_number
        if len(_serials_by_pem) > 1024:  # peers rotate certificates: don't grow forever
            _serials_by_pem.clear()
        _serials_by_pem[cert_pem] = serial
    return serial


# --- ssl (plain sockets: KV transfer, HTTP) ----------------------------------------------------


def server_ssl_context(files: TlsFiles, require_client_cert: bool = True) -> ssl.SSLContext:
    """A TLS 1.3+ server context with ``files``' certificate, requiring (by default) a client
    certificate from the CA, and checking it against the CRL when one is given."""
    files.check()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    _load_chain(ctx, files)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        _load_trust(ctx, files)
    return ctx


def client_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """A TLS 1.3+ client context presenting ``files``' certificate and verifying the server's
    certificate and name (an IP address or host name in its SANs) under the CA and CRL."""
    files.check()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_chain(ctx, files)
    _load_trust(ctx, files)
    return ctx


class SslContextCache:
    """An ``ssl`` context rebuilt when the files change: ``get()`` for each new connection."""

    def __init__(self, files: TlsFiles, server: bool) -> None:
        self.files = files
        self.server = server
        self._lock = threading.Lock()
        self._version = files.version()
        self._ctx = self._build()

    def _build(self) -> ssl.SSLContext:
        return server_ssl_context(self.files) if self.server else client_ssl_context(self.files)

    def get(self) -> ssl.SSLContext:
        with self._lock:
            version = self.files.version()
            if version != self._version:
                try:
                    self._ctx = self._build()
                    self._version = version
                    log.info("TLS files changed: reloaded %s", self.files.cert)
                except (TlsError, ssl.SSLError, OSError) as exc:
                    log.warning("TLS files changed but cannot be loaded, keeping the previous ones: %s", exc)
            return self._ctx


def ssl_peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The subject CN of the peer's verified certificate on a TLS connection; None without one."""
    cert = ssl_object.getpeercert()
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def _load_chain(ctx: ssl.SSLContext, files: TlsFiles) -> None:
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as exc:
        raise TlsError(
            f"TLS certificate {files.cert} and key {files.key} do not load: {exc.reason}"
        ) from None


def _load_trust(ctx: ssl.SSLContext, files: TlsFiles) -> None:
    try:
        ctx.load_verify_locations(cafile=files.ca)
        if files.crl:
            ctx.load_verify_locations(cafile=files.crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except ssl.SSLError as exc:
        raise TlsError(f"TLS CA {files.ca} or CRL {files.crl} does not load: {exc.reason}") from None
