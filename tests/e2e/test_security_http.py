"""API keys, per-key limits and HTTPS on the coordinator's API port, over a real stack: coordinators of
the tests' own (real processes) join the stack's controller with the flags under test."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
from collections.abc import Iterator

import grpc
import httpx
import pytest

from pdmesh.launcher import LocalStack
from pdmesh.launcher_metrics import wait_metrics_address
from pdmesh.rpc.client import open_channel
from pdmesh.security.certs import write_certs
from pdmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from services.coordinator.api_keys import FILE_CHECK_S
from tests.e2e.conftest import start_stack
from tests.e2e.coordinator_proc import CoordinatorProc
from tests.e2e.helpers import wait_until

pytestmark = pytest.mark.timeout(180)

FLAG_KEY, ENV_KEY, OLD_KEY, NEW_KEY = "sk-flag-0123", "sk-env-4567", "sk-file-old-89", "sk-file-new-ab"
COMPLETION = {"prompt": "The sea is", "max_tokens": 4, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def stack(tiny_qwen3, tmp_path_factory) -> Iterator[LocalStack]:
    stack = start_stack(tiny_qwen3, tmp_path_factory, prefill=1, decode=0, mode="mixed")
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def coordinator(stack, tmp_path):
    """Starts coordinators with the given flags; stops them all after the test."""
    started: list[CoordinatorProc] = []

    def start(flags: list[str], env: dict[str, str] | None = None) -> CoordinatorProc:
        started.append(CoordinatorProc(stack, tmp_path / f"coordinator-{len(started)}.log", flags, env))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"


def _write_keys(path, *keys: str) -> None:
    """Replaces the key file at once (as a secret mount or `mv` does)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("# API keys\n" + "".join(f"{k}\n" for k in keys))
    os.replace(tmp, path)


def test_api_keys_guard_http_and_grpc_and_rotate(coordinator, tmp_path):
    key_file = tmp_path / "keys"
    _write_keys(key_file, OLD_KEY)
    flags = ["--api-key", FLAG_KEY, "--api-key-file", str(key_file), "--metrics-port", "0"]
    proc = coordinator(flags).wait_ready()
    env_proc = coordinator([], env={"PDMESH_COORDINATOR_API_KEYS": f"{ENV_KEY},other"}).wait_ready()
    url = proc.base_url()
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").status_code == 200  # probes stay open
        _assert_401(client.post("/v1/completions", json=COMPLETION))
        _assert_401(client.post("/v1/completions", json=COMPLETION, headers=_bearer("sk-wrong")))
        _assert_401(client.get("/v1/models", headers=_bearer(ENV_KEY)))  # another coordinator's key
        answer = client.post("/v1/completions", json=COMPLETION, headers=_bearer(FLAG_KEY))
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 4 and answer.json()["choices"][0]["text"]
        assert client.get("/v1/models", headers={"x-api-key": OLD_KEY}).status_code == 200

        # rotation: the old key is refused within seconds, the new one is taken
        _write_keys(key_file, NEW_KEY)
        wait_until(
            lambda: client.get("/v1/models", headers=_bearer(OLD_KEY)).status_code == 401,
            timeout_s=FILE_CHECK_S * 5,
            what="the rotated-out key refused",
        )
        assert client.get("/v1/models", headers=_bearer(NEW_KEY)).status_code == 200
        assert client.get("/v1/models", headers=_bearer(FLAG_KEY)).status_code == 200
    env_answer = httpx.get(f"{env_proc.base_url()}/v1/models", headers=_bearer(ENV_KEY), timeout=10)
    assert env_answer.status_code == 200

    # the metrics port is another server and stays open
    metrics = wait_metrics_address(proc.log_path, 0, 30, lambda: proc.proc.poll() is None)
    assert httpx.get(f"http://{metrics}/metrics", timeout=10).status_code == 200
    assert not any(key in proc.log() for key in (FLAG_KEY, OLD_KEY, NEW_KEY)), "a key was logged"


def test_dashboard_takes_the_key_once_then_a_cookie(coordinator):
    proc = coordinator(["--api-key", FLAG_KEY]).wait_ready()
    with httpx.Client(base_url=proc.base_url(), timeout=30, follow_redirects=True) as browser:
        _assert_401(browser.get("/dashboard"))
        page = browser.get("/dashboard", params={"key": FLAG_KEY})
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert str(page.url).endswith("/dashboard")  # the key left the address bar
        assert browser.get("/dashboard/data").status_code == 200  # the page's own fetch
        _assert_401(browser.get("/v1/models"))  # the cookie is for the dashboard only
    _assert_401(httpx.get(f"{proc.base_url()}/dashboard", params={"key": "sk-wrong"}, timeout=30))


def _generate(address: str, metadata=None):
    async def run():
        async with open_channel(address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            request = coordinator_pb2.GenerateRequest(
                prompt="The sea is",
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
            )
            try:
                return [r async for r in stub.Generate(request, timeout=60, metadata=metadata)]
            except grpc.aio.AioRpcError as exc:
                return exc

    return asyncio.run(run())


def test_grpc_generate_needs_the_key(coordinator):
    proc = coordinator(["--api-key", FLAG_KEY]).wait_ready()
    for metadata in (None, (("authorization", "Bearer sk-wrong"),)):
        refused = _generate(proc.grpc_address, metadata)
        assert isinstance(refused, grpc.aio.AioRpcError)
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    replies = _generate(proc.grpc_address, (("authorization", f"Bearer {FLAG_KEY}"),))
    assert not isinstance(replies, Exception) and replies[-1].usage.completion_tokens == 3


def test_per_key_rate_limit(coordinator):
    # 0.2 rps: the second request of a key within 5 s is over
    proc = coordinator(["--api-key", "sk-a", "--api-key", "sk-b", "--api-key-max-rps", "0.2"]).wait_ready()
    with httpx.Client(base_url=proc.base_url(), timeout=60) as client:
        assert client.get("/v1/models", headers=_bearer("sk-a")).status_code == 200
        over = client.get("/v1/models", headers=_bearer("sk-a"))
        assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1
        assert over.json()["error"]["param"] == "api_key_max_rps"
        assert over.json()["error"]["type"] == "rate_limit_error"
        assert client.get("/v1/models", headers=_bearer("sk-b")).status_code == 200  # per key


def test_per_key_concurrency_limit(coordinator):
    proc = coordinator(["--api-key", "sk-b", "--api-key", "sk-c", "--api-key-max-concurrency", "1"])
    proc.wait_ready()
    body_sent = threading.Event()
    result: dict = {}

    def slow_body():
        """A request in progress for as long as the test wants: its body arrives in two parts."""
        yield b'{"prompt": "The sea is", '
        body_sent.wait(60)
        yield b'"max_tokens": 2, "temperature": 0, "ignore_eos": true}'

    def send() -> None:
        headers = {**_bearer("sk-b"), "Content-Type": "application/json"}
        result["response"] = httpx.post(
            f"{proc.base_url()}/v1/completions", content=slow_body(), headers=headers, timeout=60
        )

    holder = threading.Thread(target=send)
    holder.start()
    try:
        with httpx.Client(base_url=proc.base_url(), timeout=60) as client:
            wait_until(
                lambda: client.get("/v1/models", headers=_bearer("sk-b")).status_code == 429,
                timeout_s=30,
                what="sk-b's second request at once refused",
            )
            busy = client.get("/v1/models", headers=_bearer("sk-b"))
            assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["param"] == "api_key_max_concurrency"
            assert client.get("/v1/models", headers=_bearer("sk-c")).status_code == 200  # per key
            body_sent.set()
            holder.join(60)
            assert result["response"].status_code == 200, result["response"].text
            wait_until(  # the slot is given back once the response is out
                lambda: client.get("/v1/models", headers=_bearer("sk-b")).status_code == 200,
                timeout_s=10,
                what="sk-b's slot given back",
            )
    finally:
        body_sent.set()
        holder.join(60)


def _tls_files(tmp_path):
    certs = write_certs(tmp_path / "tls")
    return certs, [
        "--http-tls-cert",
        str(certs.cert("coordinator")),
        "--http-tls-key",
        str(certs.key("coordinator")),
    ]


def test_https_with_tls13_minimum(coordinator, tmp_path):
    certs, flags = _tls_files(tmp_path)
    trust = ssl.create_default_context(cafile=str(certs.ca))
    proc = coordinator(flags).wait_ready("https", verify=trust)
    answer = httpx.post(f"{proc.base_url('https')}/v1/completions", json=COMPLETION, verify=trust, timeout=60)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
    with pytest.raises(httpx.TransportError):  # plain HTTP to the HTTPS port
        httpx.get(f"{proc.base_url('http')}/health", timeout=10)

    old = ssl.create_default_context(cafile=str(certs.ca))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", proc.http_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):  # (asyncio's TLS closes without an alert: EOF, not a reason)
            old.wrap_socket(raw, server_hostname="127.0.0.1").close()
    # the same client allowed TLS 1.3 gets through: the version was the reason
    with socket.create_connection(("127.0.0.1", proc.http_port), timeout=10) as raw:
        with trust.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.3"


def test_https_key_readable_by_others_is_refused(coordinator, tmp_path):
    certs, flags = _tls_files(tmp_path)
    os.chmod(certs.key("coordinator"), 0o644)
    proc = coordinator(flags)
    assert proc.wait_exit() != 0
    assert f"{certs.key('coordinator')} has mode 0644, looser than 0600" in proc.log()
