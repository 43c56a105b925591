"""Starts and stops a whole local stack as real processes: Redis, controller, workers, coordinator.

``pdmesh up`` runs it in the foreground; the end-to-end tests use it as a library, so what the tests
exercise is exactly what a user starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pdmesh.redis_server import RedisServer
from pdmesh.rpc.client import wait_healthy

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def parse_cpus(spec: str) -> set[int]:
    """The CPUs of a taskset-style list such as ``"0"``, ``"0-3"`` or ``"0,2-3"``; ValueError if bad."""
    cpus: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"bad CPU list {spec!r} (expected e.g. 0, 0-1 or 0,2)") from None
    if not cpus or min(cpus) < 0:
        raise ValueError(f"bad CPU list {spec!r} (expected e.g. 0, 0-1 or 0,2)")
    return cpus


@dataclass
class StackSpec:
    """What to start. In mixed mode ``prefill + decode`` mixed workers run instead (same total)."""

    model_dir: Path
    prefill: int = 1
    decode: int = 1
    mode: str = "pd"  # "pd" or "mixed"
    host: str = "127.0.0.1"
    http_port: int = 8000
    redis_url: str | None = None
    log_dir: Path | None = None
    worker_args: dict[str, str] = field(default_factory=dict)
    coordinator_args: dict[str, str] = field(default_factory=dict)
    controller_args: dict[str, str] = field(default_factory=dict)
    controllers: int = (
        1  # more than one: active/standby over the Redis lease ("controller", "controller-1", ...)
    )
    startup_timeout_s: float = 120.0
    # one CPU list per worker in start order ("0", "0-1", "2,4"): pinned with taskset (or
    # sched_setaffinity), with OMP_NUM_THREADS/MKL_NUM_THREADS set to its core count. None: no pinning.
    worker_cpus: list[str] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("pd", "mixed"):
            raise ValueError(f"mode must be 'pd' or 'mixed', not {self.mode!r}")
        if self.mode == "pd" and (self.prefill < 1 or self.decode < 1):
            raise ValueError("a PD stack needs at least one prefill and one decode worker")
        if self.controllers < 1:
            raise ValueError("at least one controller must run")
        if self.prefill < 0 or self.decode < 0 or self.prefill + self.decode < 1:
            raise ValueError("worker counts must be >= 0 and at least one worker must run")
        if self.worker_cpus is not None:
            if len(self.worker_cpus) != self.prefill + self.decode:
                raise ValueError(f"worker_cpus needs one CPU list per worker ({self.prefill + self.decode})")
            for cpus in self.worker_cpus:
                parse_cpus(cpus)


class LocalStack:
    """The processes of one local deployment; ``stop()`` ends every one of them."""

    def __init__(self, spec: StackSpec) -> None:
        self.spec = spec
        self.processes: dict[str, subprocess.Popen] = {}
        self.redis: RedisServer | None = None
        self.redis_url = spec.redis_url
        self.controller_address = ""
        self.http_port = spec.http_port
        self.grpc_port = 0
        self.log_dir = spec.log_dir or Path(".pdmesh/logs")

    @property
    def base_url(self) -> str:
        return f"http://{self.spec.host}:{self.http_port}"

    @property
    def coordinator_grpc(self) -> str:
        return f"{self.spec.host}:{self.grpc_port}"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_redis()
            self._start_controller()
            cpus = self.spec.worker_cpus or [None] * len(self._worker_plan())
            for (name, role), worker_cpus in zip(self._worker_plan(), cpus, strict=True):
                self._start_worker(name, role, worker_cpus)
            self._start_coordinator()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def _worker_plan(self) -> list[tuple[str, str]]:
        s = self.spec
        if s.mode == "mixed":
            return [(f"mixed-{i}", "mixed") for i in range(s.prefill + s.decode)]
        return [(f"prefill-{i}", "prefill") for i in range(s.prefill)] + [
            (f"decode-{i}", "decode") for i in range(s.decode)
        ]

    def _start_redis(self) -> None:
        if self.redis_url is None:
            self.redis = RedisServer(host=self.spec.host)
            self.redis.start()
            self.redis_url = self.redis.url

    @property
    def controller_names(self) -> list[str]:
        return ["controller", *(f"controller-{i}" for i in range(1, self.spec.controllers))]

    def _start_controller(self) -> None:
        """Starts every controller (the first one up takes the lease); ``controller_address`` lists them."""
        addresses = []
        for name in self.controller_names:
            port = free_port(self.spec.host)
            address = f"{self.spec.host}:{port}"
            args = {
                "host": self.spec.host,
                "port": str(port),
                "redis-url": self.redis_url,
                **self.spec.controller_args,
            }
            self._spawn(name, "services.controller", args)
            asyncio.run(wait_healthy(address, timeout_s=self.spec.startup_timeout_s))
            addresses.append(address)
        self.controller_address = ",".join(addresses)

    def _start_worker(self, name: str, role: str, cpus: str | None = None) -> None:
        args = {
            "host": self.spec.host,
            "port": str(free_port(self.spec.host)),
            "instance-id": name,
            "controller": self.controller_address,
            "redis-url": self.redis_url,
            "model-dir": str(self.spec.model_dir),
            **self.spec.worker_args,
        }
        module = f"services.{role}_worker"
        self._spawn(name, module, args, cpus)

    def _start_coordinator(self) -> None:
        if self.http_port == 0:
            self.http_port = free_port(self.spec.host)
        self.grpc_port = free_port(self.spec.host)
        args = {
            "host": self.spec.host,
            "http-port": str(self.http_port),
            "grpc-port": str(self.grpc_port),
            "controller": self.controller_address,
            "model-dir": str(self.spec.model_dir),
            **self.spec.coordinator_args,
        }
        self._spawn("coordinator", "services.coordinator", args)

    def _spawn(self, name: str, module: str, args: dict[str, str], cpus: str | None = None) -> None:
        argv = [sys.executable, "-m", module]
        for key, value in args.items():
            argv += [f"--{key}", value]
        out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process's lifetime
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        preexec = None
        if cpus is not None:
            threads = str(len(parse_cpus(cpus)))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
            if shutil.which("taskset"):
                argv = ["taskset", "-c", cpus, *argv]  # taskset execs: the pid stays the worker's
            else:
                preexec = functools.partial(os.sched_setaffinity, 0, parse_cpus(cpus))
        self.processes[name] = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, preexec_fn=preexec
        )
        out.close()
        log.info("started %s (pid %d)", name, self.processes[name].pid)

    def wait_ready(self) -> None:
        """Waits until the coordinator answers /health with 200 (one prefill and decode registered)."""
        deadline = time.monotonic() + self.spec.startup_timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(
            f"the stack was not ready within {self.spec.startup_timeout_s:.0f}s; logs in {self.log_dir}"
        )

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                tail = self.log_tail(name)
                raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up:\n{tail}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to one process of the stack (fault tests)."""
        self.processes[name].send_signal(sig)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every process (coordinator first, controller last), then SIGKILL stragglers."""
        controllers = [n for n in self.processes if n.startswith("controller")]
        order = [
            "coordinator",
            *[n for n in self.processes if n != "coordinator" and n not in controllers],
            *controllers,
        ]
        for name in order:
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name in order:
            proc = self.processes.get(name)
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", name)
                proc.kill()
                proc.wait()
        self.processes.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
