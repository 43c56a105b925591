"""`pdmesh up --config FILE` as a user runs it: the cluster file sets every service's settings, a flag
overrides its key, the coordinator logs its ready line once the file's instances are healthy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_up import _read_ready_line, _stop

pytestmark = pytest.mark.timeout(180)


def _commands(needle: str) -> list[str]:
    """Command lines of this machine's processes that contain ``needle``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            line = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in line:
            found.append(line)
    return found


def test_up_with_a_cluster_file(tiny_qwen3, tmp_path):
    small = {"kv_cache_memory_mib": 16, "kv_lease_s": 10.0}
    cluster = {
        "model": {"modelName": "tiny-from-file", "modelWeightPath": str(tiny_qwen3)},
        "mindie_ms_coordinator_config": {"http_port": 1, "max_queue": 17},  # the flag below wins
        "mindie_server_prefill_config": {**small, "maxPrefillTokens": 2048},
        "mindie_server_decode_config": {**small, "maxBatchSize": 6},
    }
    config = tmp_path / "user_config.json"
    config.write_text(json.dumps(cluster))
    log_dir = tmp_path / "logs"
    argv = [sys.executable, "-m", "pdmesh.cli", "up", "--config", str(config), "--http-port", "0"]
    argv += ["--metrics-port", "0"]  # the default, 9464, may be taken (another test, a real stack)
    argv += ["--log-dir", str(log_dir)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ}
    )
    try:
        url = _read_ready_line(proc)
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == "tiny-from-file"
        body = {"model": "tiny-from-file", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert (log_dir / "coordinator.log").read_text().count(
            "pdmesh coordinator is ready (1 prefill, 1 decode)"
        ) == 1
        decode = [c for c in _commands("services.decode_worker") if str(tiny_qwen3) in c]
        prefill = [c for c in _commands("services.prefill_worker") if str(tiny_qwen3) in c]
        coordinator = [c for c in _commands("services.coordinator") if "--max-queue 17" in c]
        assert any("--max-batch-size 6" in c for c in decode), decode
        assert any("--max-prefill-tokens 2048" in c for c in prefill), prefill
        assert coordinator and not any("--http-port 1 " in c for c in coordinator)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        _stop(proc)
