"""The cluster file's ``tls_config``: which channels run TLS and with which files, as MindIE's
``tls_config`` holds them (a ``*_tls_enable`` switch per channel, ``ca_cert``, ``tls_cert``,
``tls_key``, ``tls_crl``; ``*_tls_items`` for one identity's certificate and key).

Channels: ``management_tls_enable`` (mutual TLS on every gRPC link between the coordinator, the
controllers and the workers; MindIE's ``controller_server_tls_enable`` / ``mindie_mangment_tls_enable``),
``kv_transfer_tls_enable`` (the KV transfer between workers; it uses the worker's certificate, so it
follows ``management_tls_enable``; ``false`` beside it sends the KV in clear, each pull authenticated
by its handle's secret from the registry: the workers' ``kv_transfer_security: secret``),
``http_server_tls_enable`` (HTTPS on the coordinator's API port;
MindIE's ``request_server_tls_enable``) and ``redis_tls_enable`` (``rediss://`` to an external Redis,
presenting each service's certificate).

Paths are files on the machine that runs ``pdmesh up --config`` or ``pdmesh deploy render``. The
renders never copy key material: compose mounts the files as secrets, Kubernetes mounts a Secret the
user creates from them (``secret_command``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

IDENTITIES = ("controller", "coordinator", "worker")  # the services' certificates (pdmesh certs)
HTTP = "http"  # the coordinator's HTTPS certificate: its own unless http_server_tls_items
CONTAINER_TLS_DIR = "/etc/pdmesh/tls"  # where containers find their files
_SECRET_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class TlsItems(BaseModel):
    """One identity's certificate and key (MindIE's ``*_tls_items``)."""

    model_config = ConfigDict(extra="forbid")

    tls_cert: str = Field(..., min_length=1, description="certificate (PEM)")
    tls_key: str = Field(..., min_length=1, description="its private key (PEM, mode 0600 or stricter)")


class TlsConfig(BaseModel):
    """TLS per channel and the files; everything off by default (plaintext, as before)."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    management_tls_enable: bool = Field(
        False,
        validation_alias=AliasChoices("management_tls_enable", "controller_server_tls_enable"),
        description="mutual TLS on every gRPC link (coordinator, controllers, workers)",
    )
    kv_transfer_tls_enable: bool | None = Field(
        None,
        description=(
            "TLS on the KV transfer (the worker's certificate): follows management; false: KV in clear, "
            "each pull authenticated by its handle's secret"
        ),
    )
    http_server_tls_enable: bool = Field(
        False,
        validation_alias=AliasChoices("http_server_tls_enable", "request_server_tls_enable"),
        description="HTTPS (TLS 1.3) on the coordinator's API port",
    )
    redis_tls_enable: bool = Field(
        False, description="rediss:// to deploy_config.redis_url, presenting each service's certificate"
    )
    cert_dir: str | None = Field(
        None,
        description="a directory as `pdmesh certs --out` writes it: ca.pem, <identity>.pem/.key, crl.pem",
    )
    ca_cert: str | None = Field(None, description="the CA bundle (default: cert_dir/ca.pem)")
    tls_crl: str | None = Field(None, description="a CRL (default: cert_dir/crl.pem when it exists)")
    controller_tls_items: TlsItems | None = None
    coordinator_tls_items: TlsItems | None = None
    worker_tls_items: TlsItems | None = None
    http_server_tls_items: TlsItems | None = Field(
        None, description="the API port's certificate for external clients (default: the coordinator's)"
    )
    k8s_secret_name: str = Field(
        "pdmesh-tls", max_length=253, pattern=_SECRET_NAME, description="the Secret Kubernetes pods mount"
    )

    @model_validator(mode="after")
    def _consistent(self) -> TlsConfig:
        if self.kv_transfer_tls_enable and not self.management_tls_enable:
            raise ValueError(
                "kv_transfer_tls_enable: the KV transfer runs TLS with the worker's certificate, which "
                "management_tls_enable turns on; enable that too"
            )
        if self.redis_tls_enable and not self.management_tls_enable:
            raise ValueError(
                "redis_tls_enable: presents the services' certificates; needs management_tls_enable"
            )
        if self.enabled and self.cert_dir is None:
            missing = [_section(i) for i in self.identities() if self.items(i) is None]
            if self.ca_cert is None:
                missing.insert(0, "ca_cert")
            if missing:
                raise ValueError(f"TLS is enabled: give cert_dir, or {', '.join(missing)}")
        return self

    @property
    def enabled(self) -> bool:
        return self.management_tls_enable or self.http_server_tls_enable

    def items(self, identity: str) -> TlsItems | None:
        """The certificate and key named for ``identity`` (``http``: its own, else the coordinator's)."""
        if identity == HTTP:
            return self.http_server_tls_items or self.coordinator_tls_items
        return getattr(self, _section(identity))

    def identities(self) -> list[str]:
        """The certificates this configuration uses."""
        out = list(IDENTITIES) if self.management_tls_enable else []
        if self.http_server_tls_enable:
            out.append(self.http_identity())
        return list(dict.fromkeys(out))

    def http_identity(self) -> str:
        """Whose files the API port's HTTPS uses: the coordinator's, or ``http_server_tls_items``."""
        return HTTP if self.http_server_tls_items or not self.management_tls_enable else "coordinator"


@dataclass(frozen=True)
class HostFile:
    """One file a deployment needs: where it is, the key path in the cluster file that names it,
    and its name in the containers' TLS directory (and the Kubernetes Secret)."""

    path: Path
    key: str
    name: str
    private: bool = False


def host_files(tls: TlsConfig, identity: str) -> dict[str, HostFile]:
    """``{"ca"|"cert"|"key"|"crl": HostFile}`` of ``identity`` (a service, or ``http``)."""
    base = Path(tls.cert_dir) if tls.cert_dir else None
    items = tls.items(identity)
    section = _section(identity) if identity != HTTP or tls.http_server_tls_items else "coordinator_tls_items"
    own = "coordinator" if identity == HTTP and not tls.http_server_tls_items else identity
    files = {}
    if tls.management_tls_enable or identity != HTTP:
        ca = Path(tls.ca_cert) if tls.ca_cert else base / "ca.pem"
        files["ca"] = HostFile(ca, "tls_config.ca_cert" if tls.ca_cert else "tls_config.cert_dir", "ca.pem")
    if items is not None:
        files["cert"] = HostFile(Path(items.tls_cert), f"tls_config.{section}.tls_cert", f"{own}.pem")
        files["key"] = HostFile(Path(items.tls_key), f"tls_config.{section}.tls_key", f"{own}.key", True)
    else:
        files["cert"] = HostFile(base / f"{own}.pem", "tls_config.cert_dir", f"{own}.pem")
        files["key"] = HostFile(base / f"{own}.key", "tls_config.cert_dir", f"{own}.key", True)
    if tls.tls_crl:
        files["crl"] = HostFile(Path(tls.tls_crl), "tls_config.tls_crl", "crl.pem")
    elif base is not None and (base / "crl.pem").exists():
        files["crl"] = HostFile(base / "crl.pem", "tls_config.cert_dir", "crl.pem")
    return files


def all_files(tls: TlsConfig) -> dict[str, HostFile]:
    """Every file of every identity in use, by its name in the containers' directory."""
    out: dict[str, HostFile] = {}
    for identity in tls.identities():
        for f in host_files(tls, identity).values():
            out.setdefault(f.name, f)
    return out


def check_files(tls: TlsConfig) -> None:
    """Raises ValueError naming the cluster file's key when a file is missing or a private key is
    readable by others (the services would refuse it; this says so before anything starts)."""
    import os
    import stat

    for f in all_files(tls).values():
        if not f.path.is_file():
            raise ValueError(f"{f.key}: {f.path} does not exist or is not a file")
        if f.private:
            mode = stat.S_IMODE(os.stat(f.path).st_mode)
            if mode & 0o077:
                raise ValueError(
                    f"{f.key}: key file {f.path} has mode {mode:04o}, looser than 0600 (chmod 600 {f.path})"
                )


def service_flags(tls: TlsConfig, identity: str, directory: str | None = None) -> dict[str, str]:
    """``--tls-ca``/``--tls-cert``/``--tls-key``/``--tls-crl`` of a service, with its files in
    ``directory`` (containers) or where they are (``directory`` None: this machine)."""
    if not tls.management_tls_enable:
        return {}
    files = host_files(tls, identity)
    return {f"tls-{kind}": _where(f, directory) for kind, f in files.items()}


def https_flags(tls: TlsConfig, directory: str | None = None) -> dict[str, str]:
    """The coordinator's ``--http-tls-cert``/``--http-tls-key``."""
    if not tls.http_server_tls_enable:
        return {}
    identity = tls.http_identity()
    files = host_files(tls, identity)
    return {
        "http-tls-cert": _where(files["cert"], directory),
        "http-tls-key": _where(files["key"], directory),
    }


def redis_url(tls: TlsConfig, url: str, identity: str, directory: str | None = None) -> str:
    """``url`` with redis-py's TLS parameters for ``identity``'s files when ``redis_tls_enable``."""
    if not tls.redis_tls_enable:
        return url
    files = host_files(tls, identity)
    params = {
        "ssl_ca_certs": _where(files["ca"], directory),
        "ssl_certfile": _where(files["cert"], directory),
        "ssl_keyfile": _where(files["key"], directory),
    }
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in params.items())


def _section(identity: str) -> str:
    return "http_server_tls_items" if identity == HTTP else f"{identity}_tls_items"


def _where(f: HostFile, directory: str | None) -> str:
    return f"{directory}/{f.name}" if directory else str(f.path.resolve())


def secret_command(tls: TlsConfig, namespace: str, api_key_file: str | None) -> str | None:
    """The ``kubectl create secret generic`` command that puts the files in the Secret pods mount."""
    files = all_files(tls)
    if not files and not api_key_file:
        return None
    parts = ["kubectl", "-n", namespace, "create", "secret", "generic", tls.k8s_secret_name]
    parts += [f"--from-file={name}={f.path}" for name, f in files.items()]
    if api_key_file:
        parts.append(f"--from-file={API_KEYS_NAME}={api_key_file}")
    return " ".join(parts)


API_KEYS_NAME = "api-keys"  # the API key file's name in the containers' directory and the Secret
