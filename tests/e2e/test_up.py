"""`pdmesh up` as a user runs it: ready line, a curl-style request, clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(180)


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
    argv += ["--log-dir", str(tmp_path / "logs")]
    env = {**os.environ, "PDMESH_WORKER_KV_CACHE_MEMORY_MIB": "16"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = _read_ready_line(proc)
        body = {
            "model": tiny_qwen3.name,
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 5,
        }
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
