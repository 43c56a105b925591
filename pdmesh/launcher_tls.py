"""TLS and API keys for the local stack (``pdmesh up --tls --api-key-file F``, ``StackSpec.tls_dir``).

A certificate directory as ``pdmesh certs`` writes it (``ca.pem`` and ``<identity>.pem``/``.key``
per identity, ``crl.pem`` once something was revoked) gives each service its identity's files:
the controller ``controller``, the coordinator ``coordinator`` (also its HTTPS certificate on the
API port), every worker ``worker``. The launcher itself checks health as ``admin`` and trusts the
CA for the coordinator's HTTPS. Key files go to the services as paths; their contents are never
read here except by the TLS libraries, and never logged.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import time
from pathlib import Path

from pdmesh.rpc.client import check_health, open_channel

log = logging.getLogger(__name__)

# Which certificate each process of the stack presents.
SERVICE_IDENTITY = {"controller": "controller", "coordinator": "coordinator", "worker": "worker"}
LAUNCHER_IDENTITY = "admin"  # health checks (gRPC health may be called by any certificate of the CA)
RENEW_BEFORE = datetime.timedelta(days=1)  # a certificate that ends sooner is written anew


def ensure_certs(tls_dir: Path, hosts: list[str]) -> None:
    """Writes the CA and every identity's certificate to ``tls_dir`` unless those there are valid
    for ``hosts`` (each one in every certificate's SANs) for at least another day; then checks
    the files the stack uses (``TlsError``, a ValueError, naming a missing file or an open key)."""
    from pdmesh.security.certs import IDENTITIES, write_certs

    extra = sorted({h for h in hosts if h not in ("", "localhost", "127.0.0.1", "0.0.0.0", "::")})
    problem = _reuse_problem(tls_dir, extra, IDENTITIES)
    if problem is None:
        log.info("using the certificates in %s", tls_dir)
    else:
        log.info("writing certificates to %s (%s)", tls_dir, problem)
        write_certs(tls_dir, extra)
    for identity in (*SERVICE_IDENTITY.values(), LAUNCHER_IDENTITY):
        check_files(tls_dir, identity)  # e.g. a key chmod-ed open since: one line now, not 4 crashes


def _reuse_problem(tls_dir: Path, hosts: list[str], identities: tuple[str, ...]) -> str | None:
    """Why the certificates in ``tls_dir`` cannot be reused, or None when they can."""
    from cryptography import x509

    ca_path = tls_dir / "ca.pem"
    if not ca_path.exists() or not (tls_dir / "ca.key").exists():
        return "no CA yet"
    try:
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        for identity in identities:
            cert_path, key_path = tls_dir / f"{identity}.pem", tls_dir / f"{identity}.key"
            if not cert_path.exists() or not key_path.exists():
                return f"no {identity} certificate"
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if cert.issuer != ca.subject:
                return f"{identity}.pem is not from ca.pem"
            soon = datetime.datetime.now(datetime.UTC) + RENEW_BEFORE
            if cert.not_valid_after_utc < soon:
                return f"{identity}.pem expires {cert.not_valid_after_utc:%Y-%m-%d}"
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = set(sans.get_values_for_type(x509.DNSName))
            names |= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
            missing = [h for h in hosts if _normal(h) not in names]
            if missing:
                return f"{identity}.pem does not name {', '.join(missing)}"
    except (ValueError, x509.ExtensionNotFound) as exc:
        return f"unreadable certificate: {exc}"
    return None


def _normal(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _paths(tls_dir: Path, identity: str) -> dict[str, Path]:
    paths = {
        "ca": tls_dir / "ca.pem",
        "cert": tls_dir / f"{identity}.pem",
        "key": tls_dir / f"{identity}.key",
    }
    if (tls_dir / "crl.pem").exists():
        paths["crl"] = tls_dir / "crl.pem"
    return paths


def tls_files(tls_dir: Path, identity: str):
    """``identity``'s ``TlsFiles`` in ``tls_dir`` (with ``crl.pem`` when there is one)."""
    from pdmesh.security.tls import TlsFiles

    p = _paths(tls_dir, identity)
    return TlsFiles(ca=str(p["ca"]), cert=str(p["cert"]), key=str(p["key"]), crl=_opt(p.get("crl")))


def check_files(tls_dir: Path, identity: str) -> None:
    """Raises ``TlsError`` (a ValueError; one line naming the file) when ``identity``'s files are
    missing or its key is readable by others: the services would refuse them, this says so first."""
    tls_files(tls_dir, identity).load()


def _opt(path: Path | None) -> str | None:
    return None if path is None else str(path)


def service_args(tls_dir: Path | None, service: str) -> dict[str, str]:
    """The ``--tls-*`` flags of ``service`` (controller, coordinator or worker); none without TLS."""
    if tls_dir is None:
        return {}
    paths = _paths(tls_dir, SERVICE_IDENTITY[service])
    return {f"tls-{name}": str(path.resolve()) for name, path in paths.items()}


def coordinator_args(tls_dir: Path | None, api_key_file: Path | None) -> dict[str, str]:
    """HTTPS on the API port with the coordinator's certificate, and the API key file."""
    args = {}
    if tls_dir is not None:
        paths = _paths(tls_dir, SERVICE_IDENTITY["coordinator"])
        args.update(
            {"http-tls-cert": str(paths["cert"].resolve()), "http-tls-key": str(paths["key"].resolve())}
        )
    if api_key_file is not None:
        args["api-key-file"] = str(Path(api_key_file).resolve())
    return args


def http_verify(tls_dir: Path | None) -> str | bool:
    """What httpx checks the coordinator's certificate against: the stack's CA."""
    return True if tls_dir is None else str(tls_dir / "ca.pem")


async def wait_healthy_tls(address: str, tls_dir: Path, timeout_s: float) -> None:
    """``pdmesh.rpc.client.wait_healthy`` over mTLS, as ``admin``; TimeoutError naming ``address``."""
    deadline = time.monotonic() + timeout_s
    async with open_channel(address, tls_files(tls_dir, LAUNCHER_IDENTITY)) as channel:
        while time.monotonic() < deadline:
            if await check_health(channel, timeout_s=1.0):
                return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{address} did not become healthy over TLS within {timeout_s:.0f}s")


def wait_healthy(address: str, tls_dir: Path | None, timeout_s: float) -> None:
    """Waits (blocking) until the gRPC server at ``address`` is SERVING, over mTLS when ``tls_dir``."""
    from pdmesh.rpc.client import wait_healthy as wait_plain

    if tls_dir is None:
        asyncio.run(wait_plain(address, timeout_s=timeout_s))
    else:
        asyncio.run(wait_healthy_tls(address, tls_dir, timeout_s))


DEFAULT_TLS_DIR = Path(".pdmesh/tls")
REDIS_USER = "pdmesh"


def local_redis(tls_dir: Path | None, host: str):
    """The Redis a stack with TLS starts for itself: an ACL user with a fresh random password, TLS
    only (the controller's certificate serves, clients present the worker's); None without TLS."""
    if tls_dir is None:
        return None
    import secrets

    from pdmesh.redis_server import RedisServer, RedisTls

    server, client = _paths(tls_dir, "controller"), _paths(tls_dir, "worker")
    tls = RedisTls(
        ca=server["ca"].resolve(),
        cert=server["cert"].resolve(),
        key=server["key"].resolve(),
        client_cert=client["cert"].resolve(),
        client_key=client["key"].resolve(),
    )
    return RedisServer(host=host, password=secrets.token_urlsafe(24), username=REDIS_USER, tls=tls)


# Flags whose values are secrets: passed in the service's environment (PDMESH_<SERVICE>_<FIELD>), not
# on its command line, where `ps` shows them to every user of the host.
SECRET_FLAGS = ("redis-url",)


def secret_env(module: str, args: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(args without the secret flags, their environment variables)`` for a service module."""
    service = "CONTROLLER" if module == "services.controller" else "WORKER"
    if module == "services.coordinator":
        service = "COORDINATOR"
    env = {
        f"PDMESH_{service}_{flag.upper().replace('-', '_')}": args[flag]
        for flag in SECRET_FLAGS
        if flag in args
    }
    return {k: v for k, v in args.items() if k not in SECRET_FLAGS}, env


def apply_up_flags(spec, tls: bool, tls_dir: Path | None, api_key_file: Path | None) -> str | None:
    """Sets ``pdmesh up``'s ``--tls``/``--tls-dir``/``--api-key-file`` on a StackSpec (over a
    cluster file's settings); returns the problem with them in one line, or None."""
    if tls_dir is not None and not tls:
        return "--tls-dir needs --tls"
    if tls:
        spec.tls_dir = tls_dir or DEFAULT_TLS_DIR
    if spec.tls_dir is not None:
        try:
            ensure_certs(spec.tls_dir, [spec.host])
        except (ValueError, OSError) as exc:
            return f"TLS certificates in {spec.tls_dir}: {exc}"
    if api_key_file is not None:
        if not api_key_file.is_file():
            return f"--api-key-file {api_key_file}: no such file"
        spec.api_key_file = api_key_file
    return None


def ready_hint(spec, base_url: str) -> list[str]:
    """How to call the stack when it asks for TLS or an API key (the key itself is never printed)."""
    if spec.tls_dir is None and spec.api_key_file is None:
        return []
    parts = ["curl"]
    if spec.tls_dir is not None:
        parts.append(f"--cacert {spec.tls_dir / 'ca.pem'}")
    if spec.api_key_file is not None:
        key = f"$(grep -v '^#' {spec.api_key_file} | head -n1)"
        parts.append(f'-H "Authorization: Bearer {key}"')
    return ["call it: " + " ".join([*parts, f"{base_url}/v1/models"])]
