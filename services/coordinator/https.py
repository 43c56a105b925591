"""HTTPS on the coordinator's API port (``--http-tls-cert/--http-tls-key``): TLS 1.3 at least.

The certificate is for external clients and may differ from the internal mTLS one; no client
certificate is asked for (clients authenticate with API keys). A key file readable by others is
refused at startup (pdmesh.security.tls.TlsFiles.check).
"""

from __future__ import annotations

import ssl

from pdmesh.security.tls import TlsError, TlsFiles


def https_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context over ``cert``/``key`` refusing anything older than TLS 1.3."""
    TlsFiles(ca=cert, cert=cert, key=key).check()  # no CA here: the certificate stands in for it
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsError(
            f"HTTPS certificate {cert} and key {key} cannot be used: {exc.reason or exc}"
        ) from None
    return ctx
