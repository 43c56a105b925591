"""A private CA and one certificate per service identity, written as PEM files (``pdmesh certs``).

The identity of a peer is its certificate's subject CN (exactly the identity string), repeated as a
SAN URI ``pdmesh://identity/<identity>``. Every certificate also carries the server SANs (DNS
localhost and the given host names, IP 127.0.0.1 and the given addresses), because every service
but ``admin`` both serves and calls; the gRPC clients check the server's name against them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

IDENTITIES = ("coordinator", "controller", "worker", "admin")
IDENTITY_URI_PREFIX = "pdmesh://identity/"
CA_VALID_DAYS = 3650
CERT_VALID_DAYS = 825
CRL_VALID_DAYS = 30


@dataclass(frozen=True)
class CertPaths:
    """Where ``write_certs`` put the CA and the identities' files."""

    out_dir: Path

    @property
    def ca(self) -> Path:
        return self.out_dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.out_dir / "ca.key"

    @property
    def crl(self) -> Path:
        return self.out_dir / "crl.pem"

    def cert(self, identity: str) -> Path:
        return self.out_dir / f"{identity}.pem"

    def key(self, identity: str) -> Path:
        return self.out_dir / f"{identity}.key"


def write_certs(
    out_dir: str | Path,
    hosts: list[str] | None = None,
    identities: tuple[str, ...] = IDENTITIES,
    new_ca: bool = False,
) -> CertPaths:
    """Writes ``ca.pem``/``ca.key`` and ``<identity>.pem``/``.key`` for each identity under
    ``out_dir`` (keys mode 0600). An existing CA there is kept (the certificates are renewed under
    it) unless ``new_ca``; ``hosts`` are extra DNS names or IP addresses for the SANs."""
    paths = CertPaths(Path(out_dir))
    paths.out_dir.mkdir(parents=True, exist_ok=True)
    hosts = [h for h in (hosts or []) if h]
    for host in hosts:
        _check_host(host)
    if new_ca or not (paths.ca.exists() and paths.ca_key.exists()):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key)
        _write_key(paths.ca_key, ca_key)
        _write_atomic(paths.ca, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        if paths.crl.exists():  # the old CA's CRL would not verify under the new one: start empty
            _write_crl(paths, ca_key, ca_cert, [], 1)
    else:
        ca_key, ca_cert = _load_ca(paths)
    for identity in identities:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf_certificate(identity, key, ca_key, ca_cert, hosts)
        # The key first: a reader that sees the new certificate must find its key.
        _write_key(paths.key(identity), key)
        _write_atomic(paths.cert(identity), cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def revoke(out_dir: str | Path, identity: str) -> Path:
    """Adds the current ``<identity>.pem`` to ``crl.pem`` (created or re-signed by the CA); returns
    the CRL's path."""
    paths = CertPaths(Path(out_dir))
    cert_path = paths.cert(identity)
    if not cert_path.exists():
        raise FileNotFoundError(f"no certificate {cert_path} to revoke")
    ca_key, ca_cert = _load_ca(paths)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    now = _now()
    revoked: dict[int, x509.RevokedCertificate] = {}
    number = 1
    if paths.crl.exists():
        old = x509.load_pem_x509_crl(paths.crl.read_bytes())
        revoked = {r.serial_number: r for r in old}
        try:
            number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        except x509.ExtensionNotFound:
            number = 1
    if cert.serial_number not in revoked:
        revoked[cert.serial_number] = (
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(now).build()
        )
    _write_crl(paths, ca_key, ca_cert, list(revoked.values()), number)
    return paths.crl


def _write_crl(
    paths: CertPaths,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: list[x509.RevokedCertificate],
    number: int,
) -> None:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(days=CRL_VALID_DAYS))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    _write_atomic(paths.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _check_host(host: str) -> None:
    if any(c.isspace() for c in host) or "/" in host or ":" in host and not _is_ip(host):
        raise ValueError(f"not a host name or IP address: {host!r}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pdmesh CA")])
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_certificate(
    identity: str,
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
) -> x509.Certificate:
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(IDENTITY_URI_PREFIX + identity),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    for host in hosts:
        name = x509.IPAddress(ipaddress.ip_address(host)) if _is_ip(host) else x509.DNSName(host)
        if name not in names:
            names.append(name)
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _load_ca(paths: CertPaths) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    for path in (paths.ca, paths.ca_key):
        if not path.exists():
            raise FileNotFoundError(f"no CA file {path} (run `pdmesh certs --out {paths.out_dir}` first)")
    key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{paths.ca_key} is not an EC private key")
    return key, x509.load_pem_x509_certificate(paths.ca.read_bytes())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomic(path, data, 0o600)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Writes through a temporary file renamed over ``path``: a process reloading the files never
    reads half a file, and a key is never readable by others, not even for a moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
