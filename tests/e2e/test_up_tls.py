"""`pdmesh up --tls --api-key-file F` as a user runs it: certificates written, HTTPS with the key
serves a PD request (401 without it), plaintext and an untrusted CA are refused, clean stop; and a
cluster file whose tls_config is wrong fails in one line with exit status 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys

import httpx
import pytest

from tests.e2e.test_up import _Lines, _stop

pytestmark = pytest.mark.timeout(240)

KEY = "sk-up-tls-test-key"


def _up(argv: list[str], tmp_path) -> subprocess.Popen:
    env = {**os.environ, "PDMESH_WORKER_KV_CACHE_MEMORY_MIB": "16"}
    base = [sys.executable, "-m", "pdmesh.cli", "up", "--http-port", "0", "--metrics-port", "0"]
    base += ["--log-dir", str(tmp_path / "logs")]
    return subprocess.Popen(
        [*base, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def test_up_tls_with_api_key_serves_https_and_stops(tiny_qwen3, tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text(f"# the test's key\n{KEY}\n")
    tls_dir = tmp_path / "tls"
    proc = _up(
        ["--model", str(tiny_qwen3), "--tls", "--tls-dir", str(tls_dir), "--api-key-file", str(keys)],
        tmp_path,
    )
    try:
        lines = _Lines(proc)
        url = lines.wait_for(r"pdmesh ready: (\S+)", 180).group(1)
        assert url.startswith("https://127.0.0.1:")
        hint = lines.wait_for(r"call it: (.*)", 10).group(1)
        assert f"--cacert {tls_dir / 'ca.pem'}" in hint and KEY not in hint
        for name in ("controller", "coordinator", "worker", "admin"):
            assert os.stat(tls_dir / f"{name}.key").st_mode & 0o077 == 0
        ca = str(tls_dir / "ca.pem")
        body = {
            "model": tiny_qwen3.name,
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 5,
        }
        ok = httpx.post(
            f"{url}/v1/chat/completions",
            json=body,
            timeout=60,
            verify=ca,
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] >= 1
        assert _tls_version(url, ca) == "TLSv1.3"
        no_key = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30, verify=ca)
        assert no_key.status_code == 401 and no_key.json()["error"]["type"], no_key.text
        with pytest.raises(httpx.HTTPError):  # plaintext HTTP to the HTTPS port
            httpx.get(url.replace("https://", "http://") + "/health", timeout=5)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the stack's CA
            httpx.get(f"{url}/health", timeout=5, verify=ssl.create_default_context())
        logs = "".join((tmp_path / "logs" / f).read_text() for f in os.listdir(tmp_path / "logs"))
        assert KEY not in logs and "PRIVATE KEY" not in logs
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2, verify=ca)
    finally:
        _stop(proc)


def _tls_version(url: str, ca: str) -> str:
    """The TLS version a client that trusts ``ca`` negotiates with the API port."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname=host) as tls:
            return tls.version()


def _cluster_file(tmp_path, model_dir, tls_config: dict):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"model": {"modelWeightPath": str(model_dir)}, "tls_config": tls_config}))
    return path


@pytest.mark.parametrize("problem", ["missing", "loose"])
def test_up_config_bad_tls_config_is_one_line_exit_2(tiny_qwen3, tmp_path, problem):
    from pdmesh.security.certs import write_certs

    certs = write_certs(tmp_path / "certs")
    if problem == "missing":
        certs.key("worker").unlink()
    else:
        certs.key("worker").chmod(0o644)
    tls = {"management_tls_enable": True, "http_server_tls_enable": True, "cert_dir": str(certs.out_dir)}
    proc = _up(["--config", str(_cluster_file(tmp_path, tiny_qwen3, tls))], tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("pdmesh up: ")]
    assert len(errors) == 1 and "Traceback" not in out, out
    assert "tls_config.cert_dir" in errors[0] and "worker.key" in errors[0]
    assert ("does not exist" if problem == "missing" else "looser than 0600") in errors[0]


def test_up_config_tls_config_serves_https(tiny_qwen3, tmp_path):
    from pdmesh.security.certs import write_certs

    certs = write_certs(tmp_path / "certs")
    tls = {"management_tls_enable": True, "http_server_tls_enable": True, "cert_dir": str(certs.out_dir)}
    proc = _up(["--config", str(_cluster_file(tmp_path, tiny_qwen3, tls))], tmp_path)
    try:
        lines = _Lines(proc)
        url = lines.wait_for(r"pdmesh ready: (\S+)", 180).group(1)
        assert url.startswith("https://")
        body = {"model": tiny_qwen3.name, "prompt": "Hello", "max_tokens": 4}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60, verify=str(certs.ca))
        assert reply.status_code == 200, reply.text
        coordinator = (tmp_path / "logs" / "coordinator.log").read_text()
        assert "TLS on" in coordinator
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        _stop(proc)
