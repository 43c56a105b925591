"""Redis with an ACL user's password and TLS (mutual: clients present a certificate): a whole PD stack
works through it; a controller or worker with no or a wrong password, or plain text to the TLS port,
fails its start with one clear line that does not show the password."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from pdmesh.launcher import ROOT, LocalStack
from pdmesh.redis_server import RedisServer, RedisTls
from pdmesh.security.certs import write_certs
from tests.e2e.conftest import start_stack

pytestmark = pytest.mark.timeout(180)

USER, PASSWORD = "pdmesh", "redis-pw-5f3a"


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory) -> Iterator[RedisServer]:
    certs = write_certs(tmp_path_factory.mktemp("tls"))
    # Redis serves with the controller's certificate (every pdmesh certificate has the 127.0.0.1 SAN);
    # its clients present the worker's.
    tls = RedisTls(
        ca=certs.ca,
        cert=certs.cert("controller"),
        key=certs.key("controller"),
        client_cert=certs.cert("worker"),
        client_key=certs.key("worker"),
    )
    server = RedisServer(password=PASSWORD, username=USER, tls=tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(tiny_qwen3, tmp_path_factory, secure_redis) -> Iterator[LocalStack]:
    stack = start_stack(tiny_qwen3, tmp_path_factory, prefill=1, decode=1, redis_url=secure_redis.url)
    try:
        yield stack
    finally:
        stack.stop()


def test_pd_stack_over_redis_with_password_and_tls(stack, secure_redis):
    assert secure_redis.url.startswith(f"rediss://{USER}:")
    body = {"prompt": "The sea is", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    answer = httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 5
    for name in ("controller", "prefill-0", "decode-0"):
        assert PASSWORD not in (stack.log_dir / f"{name}.log").read_text(errors="replace")


def _start_fails(module: str, redis_url: str, model_dir) -> str:
    """Runs a service against ``redis_url``; asserts it exits 1 and returns its output."""
    argv = [sys.executable, "-m", module, "--redis-url", redis_url]
    if module != "services.controller":
        argv += ["--controller", "127.0.0.1:1", "--model-dir", str(model_dir)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    return done.stderr.strip().splitlines()[-1]


def test_startup_fails_clearly_without_the_password(secure_redis, tiny_qwen3):
    base = secure_redis.url
    no_password = base.replace(f"{USER}:{PASSWORD}@", "")
    wrong = base.replace(PASSWORD, "not-it")
    for module in ("services.controller", "services.prefill_worker"):
        line = _start_fails(module, no_password, tiny_qwen3)
        assert f"Redis at rediss://127.0.0.1:{secure_redis.port}/0" in line
        assert "it requires a password" in line
    line = _start_fails("services.controller", wrong, tiny_qwen3)
    assert f"rediss://{USER}:***@127.0.0.1:{secure_redis.port}/0" in line
    assert "wrong user name or password" in line
    plain = f"redis://{USER}:{PASSWORD}@127.0.0.1:{secure_redis.port}/0"
    line = _start_fails("services.controller", plain, tiny_qwen3)
    assert "is it a TLS port (then use rediss://)?" in line
