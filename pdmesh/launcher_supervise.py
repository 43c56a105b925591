"""The local stack's supervisor: restarts a worker that died, backing off while it keeps crashing
(Kubernetes' shape), and the process-group signalling that stopping and restarting share."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("pdmesh.launcher")
SUPERVISE_INTERVAL_S = 0.2  # how often the supervisor looks for dead workers


@dataclass(frozen=True)
class Restart:
    """One restart of a worker by the supervisor."""

    name: str
    old_pid: int
    exit_code: int
    at: float  # time.time() of the restart
    delay_s: float
    new_pid: int


class Supervision:
    """The supervising half of ``LocalStack``: its thread restarts dead workers until ``stop()``.

    It reads the stack's ``spec``, ``processes``, ``_launches``, ``_lock``, ``_stopping`` and
    ``restarts``, and ``_worker_plan()``; it starts processes with the stack's ``_popen``."""

    _lock: threading.Lock
    _stopping: threading.Event

    def _supervise(self) -> None:
        """Restarts dead workers until ``stop()``; one bad restart never ends the supervision."""
        workers = [name for name, _ in self._worker_plan()]
        while not self._stopping.wait(SUPERVISE_INTERVAL_S):
            for name in workers:
                try:
                    with self._lock:
                        if not self._stopping.is_set():
                            self._supervise_one(name, time.monotonic())
                except Exception:  # noqa: BLE001 - logged; the next pass tries again
                    log.exception("supervising %s failed", name)

    def _supervise_one(self, name: str, now: float) -> None:
        launch, proc = self._launches[name], self.processes[name]
        if launch.restart_at is None:
            code = proc.poll()
            if code is None:
                return
            kill_group(proc)  # whatever it started goes with it
            ran_s = now - launch.started_at
            launch.crashes = 1 if ran_s >= self.spec.restart_reset_s else launch.crashes + 1
            delay = self._backoff(launch.crashes)
            launch.restart_at = now + delay
            loop = f" (crash loop: {launch.crashes} in a row)" if launch.crashes > 1 else ""
            log.warning(
                "%s (pid %d) exited with code %s after %.1fs; restarting in %.1fs%s",
                name, proc.pid, exit_text(code), ran_s, delay, loop,
            )  # fmt: skip
            if delay > 0:
                return
        if now < launch.restart_at:
            return
        launch.restart_at = None
        new = self._popen(name)
        self.restarts.append(
            Restart(name, proc.pid, proc.returncode, time.time(), self._backoff(launch.crashes), new.pid)
        )
        log.warning("restarted %s (pid %d, restart #%d)", name, new.pid, self.restart_count(name))

    def _backoff(self, crashes: int) -> float:
        """0 for the first death, then backoff, 2x backoff, ... up to the maximum (Kubernetes' shape)."""
        if crashes <= 1:
            return 0.0
        return min(self.spec.restart_backoff_s * 2 ** (crashes - 2), self.spec.restart_backoff_max_s)

    def restart_count(self, name: str) -> int:
        """How many times the supervisor restarted ``name``."""
        return sum(1 for r in self.restarts if r.name == name)


def exit_text(code: int) -> str:
    """``-9 (SIGKILL)`` for a death by signal, else the exit status."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signals the process group of ``proc`` (its pid: each service leads a session of its own)."""
    if proc.returncode is not None and os.path.exists(f"/proc/{proc.pid}"):
        # reaped earlier, and its pid belongs to another process now: that group is not ours
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def kill_group(proc: subprocess.Popen) -> None:
    signal_group(proc, signal.SIGKILL)
