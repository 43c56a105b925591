"""A coordinator process of a test's own, next to a stack's (same controller), with extra flags."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pdmesh.launcher import ROOT
from pdmesh.ports import free_port

READY_TIMEOUT_S = 60.0


class CoordinatorProc:
    """``python -m services.coordinator`` on free ports; ``stop()`` ends it (also after a failed start)."""

    def __init__(self, stack, log_path: Path, flags: list[str], env: dict[str, str] | None = None) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        self.log_path = log_path
        argv = [
            sys.executable, "-m", "services.coordinator",
            "--controller", stack.controller_address, "--model-dir", str(stack.spec.model_dir),
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--ready-mixed-instances", str(stack.spec.prefill + stack.spec.decode), *flags,
        ]  # fmt: skip
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def base_url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def wait_ready(self, scheme: str = "http", verify=True) -> CoordinatorProc:
        """Waits until /ready answers 200 (it needs no key); fails with the log when the process exits."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"coordinator exited: {self.log()}"
            try:
                if httpx.get(f"{self.base_url(scheme)}/ready", timeout=2.0, verify=verify).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"coordinator not ready within {READY_TIMEOUT_S}s: {self.log()}")

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        return self.proc.wait(timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
