"""Certificates (pdmesh.security.certs), TLS files and ssl contexts (pdmesh.security.tls), the TLS
config fields: real keys, real handshakes over loopback sockets."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from pdmesh.config import ControllerConfig, CoordinatorConfig, WorkerConfig
from pdmesh.security import tls
from pdmesh.security.certs import IDENTITIES, IDENTITY_URI_PREFIX, revoke, write_certs


def _files(d: Path, identity: str, crl: bool = False) -> tls.TlsFiles:
    return tls.TlsFiles(
        ca=str(d / "ca.pem"),
        cert=str(d / f"{identity}.pem"),
        key=str(d / f"{identity}.key"),
        crl=str(d / "crl.pem") if crl else None,
    )


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_write_certs_identities_sans_and_modes(tmp_path):
    paths = write_certs(tmp_path, ["10.1.2.3", "node-a.example"])
    ca = _cert(paths.ca)
    for identity in IDENTITIES:
        cert = _cert(paths.cert(identity))
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert IDENTITY_URI_PREFIX + identity in san.get_values_for_type(x509.UniformResourceIdentifier)
        assert {"localhost", "node-a.example"} <= set(san.get_values_for_type(x509.DNSName))
        assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
        cert.verify_directly_issued_by(ca)
        assert os.stat(paths.key(identity)).st_mode & 0o777 == 0o600
    assert os.stat(paths.ca_key).st_mode & 0o777 == 0o600


def test_write_certs_again_keeps_the_ca_unless_asked(tmp_path):
    first = _cert(write_certs(tmp_path).ca)
    renewed = write_certs(tmp_path)
    assert _cert(renewed.ca) == first
    _cert(renewed.cert("worker")).verify_directly_issued_by(first)
    assert _cert(write_certs(tmp_path, new_ca=True).ca) != first


def test_write_certs_refuses_a_bad_host(tmp_path):
    with pytest.raises(ValueError, match="not a host name"):
        write_certs(tmp_path, ["http://x/y"])


def test_revoke_lists_the_serial_in_a_signed_crl(tmp_path):
    paths = write_certs(tmp_path)
    revoke(tmp_path, "worker")
    crl_path = revoke(tmp_path, "admin")
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert crl.is_signature_valid(_cert(paths.ca).public_key())
    serials = {r.serial_number for r in crl}
    assert serials == {_cert(paths.cert("worker")).serial_number, _cert(paths.cert("admin")).serial_number}
    revocations = tls.RevocationList(_files(tmp_path, "worker", crl=True))
    assert revocations.is_revoked(paths.cert("admin").read_bytes())
    assert not revocations.is_revoked(paths.cert("coordinator").read_bytes())


def test_revoke_without_certificate_names_it(tmp_path):
    write_certs(tmp_path)
    with pytest.raises(FileNotFoundError, match="nobody.pem"):
        revoke(tmp_path, "nobody")


def test_load_refuses_a_key_readable_by_others(tmp_path):
    write_certs(tmp_path)
    os.chmod(tmp_path / "worker.key", 0o644)
    with pytest.raises(tls.TlsError, match=r"worker.key has mode 0644, looser than 0600"):
        _files(tmp_path, "worker").load()


def test_load_names_a_missing_file(tmp_path):
    write_certs(tmp_path)
    files = tls.TlsFiles(
        ca=str(tmp_path / "nope.pem"), cert=str(tmp_path / "worker.pem"), key=str(tmp_path / "worker.key")
    )
    with pytest.raises(tls.TlsError, match="nope.pem does not exist"):
        files.load()
    with pytest.raises(tls.TlsError, match="nope.pem"):
        tls.configure(files)
    assert tls.current() is None


def test_material_repr_hides_the_key(tmp_path):
    write_certs(tmp_path)
    material = _files(tmp_path, "worker").load()
    assert b"PRIVATE KEY" in material.key
    assert "PRIVATE" not in repr(material) and "hidden" in repr(material)


@pytest.mark.parametrize(
    "cls,extra",
    [
        (ControllerConfig, {}),
        (CoordinatorConfig, {"controller": "127.0.0.1:1", "model_dir": "/m"}),
        (WorkerConfig, {"controller": "127.0.0.1:1", "redis_url": "redis://x", "model_dir": "/m"}),
    ],
)
def test_config_needs_ca_and_key_with_a_cert(cls, extra):
    with pytest.raises(ValidationError, match="tls_cert is set without tls_ca and tls_key"):
        cls(tls_cert="c.pem", **extra)
    with pytest.raises(ValidationError, match="tls_key set without tls_cert"):
        cls(tls_key="k.pem", **extra)
    config = cls(tls_cert="c.pem", tls_ca="ca.pem", tls_key="k.pem", **extra)
    assert tls.files_from(config) == tls.TlsFiles(ca="ca.pem", cert="c.pem", key="k.pem")
    assert tls.files_from(cls(**extra)) is None


def test_tls_env_vars(monkeypatch):
    monkeypatch.setenv("PDMESH_CONTROLLER_TLS_CERT", "c.pem")
    monkeypatch.setenv("PDMESH_CONTROLLER_TLS_CA", "ca.pem")
    monkeypatch.setenv("PDMESH_CONTROLLER_TLS_KEY", "k.pem")
    monkeypatch.setenv("PDMESH_CONTROLLER_TLS_CRL", "crl.pem")
    assert tls.files_from(ControllerConfig()) == tls.TlsFiles("ca.pem", "c.pem", "k.pem", "crl.pem")


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[str | None, str | None]:
    """One TLS handshake over loopback; returns (the identity the server saw, the client's error)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, str | None] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                seen["identity"] = tls.ssl_peer_identity(tls_conn)
                tls_conn.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen["error"] = repr(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    error = None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                assert conn.version() == "TLSv1.3"
                assert conn.recv(2) == b"ok"
    except (ssl.SSLError, OSError) as exc:
        error = repr(exc)
    finally:
        thread.join(10)
        listener.close()
    return seen.get("identity"), error


def test_ssl_contexts_mutual_tls(tmp_path):
    write_certs(tmp_path)
    identity, error = _handshake(
        tls.server_ssl_context(_files(tmp_path, "worker")),
        tls.client_ssl_context(_files(tmp_path, "coordinator")),
    )
    assert error is None and identity == "coordinator"


def test_ssl_context_refuses_another_ca_and_a_revoked_peer(tmp_path):
    write_certs(tmp_path / "a")
    write_certs(tmp_path / "b")
    server = tls.server_ssl_context(_files(tmp_path / "a", "worker"))
    identity, error = _handshake(server, tls.client_ssl_context(_files(tmp_path / "b", "coordinator")))
    assert identity is None and error is not None
    revoke(tmp_path / "a", "coordinator")
    server = tls.server_ssl_context(_files(tmp_path / "a", "worker", crl=True))
    identity, error = _handshake(server, tls.client_ssl_context(_files(tmp_path / "a", "coordinator")))
    assert identity is None and error is not None


def test_ssl_context_cache_reloads_changed_files(tmp_path):
    write_certs(tmp_path)
    cache = tls.SslContextCache(_files(tmp_path, "worker"), server=True)
    first = cache.get()
    assert cache.get() is first
    write_certs(tmp_path, new_ca=True)
    assert cache.get() is not first


def test_identity_table_guards_the_admin_methods():
    from pdmesh.security.authz import UnknownMethod, allowed_identities

    assert allowed_identities("/pdmesh.v1.Controller/SetRatio") == {"admin"}
    assert allowed_identities("/pdmesh.v1.Controller/FlipRole") == {"admin"}
    assert allowed_identities("/pdmesh.v1.Controller/Drain") == {"admin", "worker"}  # a pod's preStop
    assert allowed_identities("/pdmesh.v1.Controller/Register") == {"worker"}
    assert "admin" not in allowed_identities("/pdmesh.v1.Worker/Release")
    assert allowed_identities("/grpc.health.v1.Health/Check") is None  # any certificate from the CA
    with pytest.raises(UnknownMethod):
        allowed_identities("/pdmesh.v1.Nobody/Call")
