"""`pdmesh up` as a user runs it: ready line, a curl-style request, clean stop on SIGTERM."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(180)


def _stop(proc: subprocess.Popen) -> None:
    """Stops ``pdmesh up`` as a user would (SIGTERM: it stops its services), SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read_ready_line(proc: subprocess.Popen, timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("pdmesh ready: "):
            return line.split("pdmesh ready: ", 1)[1].strip()
    raise AssertionError("no ready line; output:\n" + "".join(lines))


def test_up_serves_and_stops_cleanly(tiny_qwen3, tmp_path):
    argv = [sys.executable, "-m", "pdmesh.cli", "up", "--model", str(tiny_qwen3), "--http-port", "0"]
    argv += ["--metrics-port", "0"]  # the default, 9464, may be taken (another test, a real stack)
    argv += ["--log-dir", str(tmp_path / "logs")]
    env = {**os.environ, "PDMESH_WORKER_KV_CACHE_MEMORY_MIB": "16"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = _read_ready_line(proc)
        metrics = proc.stdout.readline()
        assert re.fullmatch(r"metrics: http://127\.0\.0\.1:\d+/metrics/mesh\n", metrics), metrics
        assert httpx.get(metrics.split(" ", 1)[1].strip(), timeout=10).status_code == 200
        body = {
            "model": tiny_qwen3.name,
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 5,
        }
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"{url}/ready", timeout=10).json() == {"status": "ready"}
        coordinator_log = (tmp_path / "logs" / "coordinator.log").read_text()
        assert coordinator_log.count("pdmesh coordinator is ready (1 prefill, 1 decode)") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        _stop(proc)


class _Lines:
    """Reads a process's output on a thread, so that waiting for a line has a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._queue.put(line) for line in proc.stdout], daemon=True).start()

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(
            f"no line matching {pattern!r} within {timeout_s}s; output:\n" + "".join(self.seen)
        )


def test_up_restarts_a_killed_worker(tiny_qwen3, tmp_path):
    logs = tmp_path / "logs"
    argv = [sys.executable, "-m", "pdmesh.cli", "up", "--model", str(tiny_qwen3), "--http-port", "0"]
    argv += ["--metrics-port", "0"]  # the default, 9464, may be taken (another test, a real stack)
    env = {**os.environ, "PDMESH_WORKER_KV_CACHE_MEMORY_MIB": "16"}
    proc = subprocess.Popen(
        [*argv, "--log-dir", str(logs)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        lines = _Lines(proc)
        pid = int(lines.wait_for(r"started prefill-0 \(pid (\d+)\)", 120).group(1))
        url = lines.wait_for(r"pdmesh ready: (\S+)", 120).group(1)
        os.kill(pid, signal.SIGKILL)
        lines.wait_for(rf"prefill-0 \(pid {pid}\) exited with code -9 \(SIGKILL\)", 30)
        lines.wait_for(r"restarted prefill-0 \(pid \d+", 30)
        serving = "prefill worker prefill-0 serving on"
        log = logs / "prefill-0.log"  # both lifetimes append to it
        deadline = time.monotonic() + 60
        while log.read_text().count(serving) < 2:
            assert time.monotonic() < deadline, "the restarted prefill-0 did not register within 60s"
            time.sleep(0.1)
        body = {"model": tiny_qwen3.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text  # the only prefill worker is the restarted one
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        _stop(proc)


def test_up_rejects_a_directory_without_a_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pdmesh.cli", "up", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "config.json" in result.stderr


def test_make_model_writes_a_checkpoint(tmp_path):
    out = tmp_path / "m"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdmesh.cli",
            "make-model",
            "--arch",
            "qwen3",
            "--preset",
            "tiny",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).exists(), name


def test_make_model_unknown_arch_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pdmesh.cli", "make-model", "--arch", "gpt9", "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "gpt9" in result.stderr
