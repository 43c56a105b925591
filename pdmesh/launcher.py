"""Starts and stops a whole local stack as real processes: Redis, controller, workers, coordinator.

``pdmesh up`` runs it in the foreground; the end-to-end tests use it as a library, so what the tests
exercise is exactly what a user starts.

Each service runs in a session (and process group) of its own, so that ``stop()`` can end it with
everything it started: SIGTERM to the group, a bounded wait, then SIGKILL to the group. With
``StackSpec.restart_workers`` a supervisor thread restarts a worker process that dies, as Kubernetes
restarts a container: same instance id and flags, at once the first time, then with an exponential
back-off while it keeps crashing (a crash loop); a worker that ran ``restart_reset_s`` resets the count.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pdmesh import cores, launcher_tls
from pdmesh.launcher_metrics import metrics_args, wait_metrics_address
from pdmesh.launcher_supervise import Restart, Supervision, kill_group, signal_group
from pdmesh.ports import free_port
from pdmesh.redis_server import RedisServer

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
KILL_WAIT_S = 5.0  # a SIGKILLed process is gone at once unless stuck in the kernel; never wait forever


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
    worker_args: dict[str, str] = field(default_factory=dict)  # every worker's flags (over role_args)
    # flags by worker role ("prefill", "decode", "mixed"): a cluster file's per-role server sections
    role_args: dict[str, dict[str, str]] = field(default_factory=dict)
    coordinator_args: dict[str, str] = field(default_factory=dict)
    controller_args: dict[str, str] = field(default_factory=dict)
    controllers: int = (
        1  # more than one: active/standby over the Redis lease ("controller", "controller-1", ...)
    )
    startup_timeout_s: float = 120.0
    # one CPU list per worker in start order ("0", "0-1", "2,4"): pinned with taskset (or
    # sched_setaffinity), with OMP_NUM_THREADS/MKL_NUM_THREADS set to its core count. None: no pinning.
    worker_cpus: list[str] | None = None
    # without worker_cpus: share this host's cores out between the workers (``pdmesh.cores``), as
    # ``pdmesh up`` does by default; off for the library (tests run many stacks on a few cores)
    pin_workers: bool = False
    # Restart a worker process that dies (``pdmesh up``); off for the library, whose fault tests
    # kill workers and expect them to stay dead.
    restart_workers: bool = False
    restart_backoff_s: float = 1.0  # delay before the 2nd restart in a row; doubles each time after
    restart_backoff_max_s: float = 30.0
    restart_reset_s: float = 60.0  # a worker that ran this long before dying restarts at once
    # the coordinator's --metrics-port (0: a free one); every other service serves on a free port.
    # None: no service serves /metrics.
    metrics_port: int | None = 0
    # TLS everywhere (``pdmesh up --tls``): certificates here (written when absent or stale), mTLS
    # on every gRPC link, HTTPS on the API port; and the coordinator's API key file
    tls_dir: Path | None = None
    api_key_file: Path | None = None

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
        if not 0 < self.restart_backoff_s <= self.restart_backoff_max_s or self.restart_reset_s <= 0:
            raise ValueError("need 0 < restart_backoff_s <= restart_backoff_max_s and restart_reset_s > 0")


@dataclass
class _Launch:
    """How one service was started, so that the supervisor can start it again the same way."""

    argv: list[str]
    env: dict[str, str]
    preexec: Callable[[], None] | None
    started_at: float = 0.0
    crashes: int = 0  # deaths in a row, each before ``restart_reset_s`` of running
    restart_at: float | None = None  # when a dead worker is due to start again
    log_offset: int = 0  # the size of its log when its current process started


class LocalStack(Supervision):
    """The processes of one local deployment; ``stop()`` ends every one of them, in bounded time."""

    def __init__(self, spec: StackSpec) -> None:
        self.spec = spec
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts: list[Restart] = []
        self._launches: dict[str, _Launch] = {}
        self._lock = threading.Lock()  # processes and launches: the supervisor thread changes them
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.redis: RedisServer | None = None
        self.redis_url = spec.redis_url
        self.controller_address = ""
        self.http_port = spec.http_port
        self.grpc_port = 0
        self.log_dir = spec.log_dir or Path(".pdmesh/logs")

    @property
    def base_url(self) -> str:
        scheme = "http" if self.spec.tls_dir is None else "https"
        return f"{scheme}://{self.spec.host}:{self.http_port}"

    @property
    def coordinator_grpc(self) -> str:
        return f"{self.spec.host}:{self.grpc_port}"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        try:
            if self.spec.tls_dir is not None:
                launcher_tls.ensure_certs(self.spec.tls_dir, [self.spec.host])
            self._start_redis()
            self._start_controller()
            cpus = self._worker_cpus() or [None] * len(self._worker_plan())
            for (name, role), worker_cpus in zip(self._worker_plan(), cpus, strict=True):
                self._start_worker(name, role, worker_cpus)
            self._start_coordinator()
            self.wait_ready()
            if self.spec.restart_workers:
                self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
                self._supervisor.start()
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

    def _worker_cpus(self) -> list[str] | None:
        """The CPU list of each worker: the spec's, else (``pin_workers``) this host's cores shared out."""
        if self.spec.worker_cpus is not None or not self.spec.pin_workers:
            return self.spec.worker_cpus
        plan = self._worker_plan()
        ranks = [self._ranks(role) for _, role in plan]
        cpus = cores.split_cores([role for _, role in plan], ranks, cores.host_cpus())
        log.info("worker CPUs: %s", dict(zip([n for n, _ in plan], cpus or [], strict=False)) or "unpinned")
        return cpus

    def _ranks(self, role: str) -> int:
        """Processes one worker of ``role`` runs (its tp x dp ranks)."""
        flags = {**self.spec.role_args.get(role, {}), **self.spec.worker_args}
        return int(flags.get("tp", 1)) * int(flags.get("dp", 1))

    def _start_redis(self) -> None:
        if self.redis_url is None:
            self.redis = launcher_tls.local_redis(self.spec.tls_dir, self.spec.host) or RedisServer(
                host=self.spec.host
            )
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
                **self._metrics_args(0),
                **launcher_tls.service_args(self.spec.tls_dir, "controller"),
                **self.spec.controller_args,
            }
            self._spawn(name, "services.controller", args)
            launcher_tls.wait_healthy(address, self.spec.tls_dir, self.spec.startup_timeout_s)
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
            **self._metrics_args(0),
            **launcher_tls.service_args(self.spec.tls_dir, "worker"),
            **self.spec.role_args.get(role, {}),
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
            **self._ready_counts(),
            **self._metrics_args(self.spec.metrics_port),
            **launcher_tls.service_args(self.spec.tls_dir, "coordinator"),
            **launcher_tls.coordinator_args(self.spec.tls_dir, self.spec.api_key_file),
            **self.spec.coordinator_args,
        }
        self._spawn("coordinator", "services.coordinator", args)

    def _metrics_args(self, port: int | None) -> dict[str, str]:
        return metrics_args(None if self.spec.metrics_port is None else port)

    def metrics_address(self, name: str) -> str:
        """``host:port`` of a service's /metrics server, once its current process logged it."""
        with self._lock:
            proc, offset = self.processes[name], self._launches[name].log_offset
        path = self.log_dir / f"{name}.log"
        return wait_metrics_address(path, offset, self.spec.startup_timeout_s, lambda: proc.poll() is None)

    def _ready_counts(self) -> dict[str, str]:
        """The coordinator turns ready once every worker of the stack is healthy."""
        if self.spec.mode == "mixed":
            return {"ready-mixed-instances": str(self.spec.prefill + self.spec.decode)}
        return {
            "ready-prefill-instances": str(self.spec.prefill),
            "ready-decode-instances": str(self.spec.decode),
        }

    def _spawn(self, name: str, module: str, args: dict[str, str], cpus: str | None = None) -> None:
        argv = [sys.executable, "-m", module]
        args, secrets = launcher_tls.secret_env(module, args)
        for key, value in args.items():
            argv += [f"--{key}", value]
        env = {**os.environ, **secrets, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        preexec = None
        if cpus is not None:
            threads = str(len(parse_cpus(cpus)))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
            if shutil.which("taskset"):
                argv = ["taskset", "-c", cpus, *argv]  # taskset execs: the pid stays the worker's
            else:
                preexec = functools.partial(os.sched_setaffinity, 0, parse_cpus(cpus))
        self._launches[name] = _Launch(argv, env, preexec)
        self._popen(name)
        log.info("started %s (pid %d)", name, self.processes[name].pid)

    def _popen(self, name: str) -> subprocess.Popen:
        """Starts (or starts again) a service in a session of its own: its process group is its pid."""
        launch = self._launches[name]
        with open(self.log_dir / f"{name}.log", "ab") as out:  # the child keeps its own descriptor
            launch.log_offset = out.tell()
            proc = subprocess.Popen(
                launch.argv, stdout=out, stderr=subprocess.STDOUT, env=launch.env, cwd=ROOT,
                preexec_fn=launch.preexec, start_new_session=True,
            )  # fmt: skip
        launch.started_at = time.monotonic()
        self.processes[name] = proc
        return proc

    def wait_ready(self) -> None:
        """Waits until the coordinator answers /ready with 200: every worker of the stack is healthy
        in its view (it has logged ``pdmesh coordinator is ready``)."""
        deadline = time.monotonic() + self.spec.startup_timeout_s
        verify = launcher_tls.http_verify(self.spec.tls_dir)
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/ready", timeout=2.0, verify=verify).status_code == 200:
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

    def restart(self, name: str) -> int:
        """Starts a service that exited (or was killed) again with the same command, port and
        identity; returns its new pid (fault tests; the supervisor does this for workers)."""
        with self._lock:
            proc = self.processes[name]
            if proc.poll() is None:
                raise RuntimeError(f"{name} (pid {proc.pid}) is still running")
            kill_group(proc)
            return self._popen(name).pid

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to one process of the stack, not its group (fault tests)."""
        with self._lock:
            self.processes[name].send_signal(sig)

    def pid(self, name: str) -> int:
        """The pid of a service's current process (a restarted worker has a new one)."""
        with self._lock:
            return self.processes[name].pid

    # -- stopping -----------------------------------------------------------------------------------

    def stop(self, timeout_s: float = 15.0) -> None:
        """Ends every process in bounded time, also after a failed start; idempotent.

        SIGTERM to each service's process group (coordinator first, controllers last), a wait of up to
        ``timeout_s`` in all, then SIGKILL to every group (stragglers and anything they left behind);
        Redis last. Returns within about ``timeout_s + KILL_WAIT_S`` plus Redis' own bounded stop.
        """
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=KILL_WAIT_S)  # it wakes every few tenths of a second
            self._supervisor = None
        with self._lock:
            procs = [(name, self.processes[name]) for name in self._stop_order()]
            self.processes.clear()
        for _, proc in procs:
            if proc.poll() is None:
                signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name, proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop within %.0fs; killing it", name, proc.pid, timeout_s)
            kill_group(proc)
        for name, proc in procs:
            try:
                proc.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) survived SIGKILL for %.0fs; leaving it", name, proc.pid, KILL_WAIT_S)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def _stop_order(self) -> list[str]:
        controllers = [n for n in self.processes if n.startswith("controller")]
        rest = [n for n in self.processes if n != "coordinator" and n not in controllers]
        return [n for n in ("coordinator",) if n in self.processes] + rest + controllers

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
