"""Worker restarts and bounded stops of a local stack (real processes): a worker killed with SIGKILL
comes back under its own instance id and serves again; ``stop()`` ends a service that does not act on
SIGTERM, and leaves nothing behind after a failed start."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis

from pdmesh.launcher import KILL_WAIT_S, LocalStack, StackSpec
from pdmesh.v1 import common_pb2
from tests.e2e.conftest import start_stack
from tests.e2e.helpers import list_instances, stream_chat, wait_until

pytestmark = pytest.mark.timeout(180)


def serving_since(stack: LocalStack, instance_id: str, since: float) -> bool:
    """The controller lists the instance healthy with a heartbeat after ``since`` (time.time())."""
    return any(
        i.instance_id == instance_id
        and i.state == common_pb2.INSTANCE_STATE_HEALTHY
        and i.last_heartbeat > since
        for i in list_instances(stack.controller_address)
    )


def chat(stack: LocalStack) -> dict:
    model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    return {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}


def kill_and_wait_back(stack: LocalStack, name: str) -> None:
    old = stack.pid(name)
    stack.kill(name, signal.SIGKILL)
    killed = time.time()
    wait_until(lambda: stack.pid(name) != old, 10, f"{name} restarted")
    restart = stack.restarts[-1]
    assert (restart.name, restart.old_pid, restart.exit_code) == (name, old, -signal.SIGKILL)
    wait_until(lambda: serving_since(stack, name, killed), 60, f"{name} healthy again at the controller")


def test_a_killed_worker_is_restarted_and_serves_again(tiny_qwen3, tmp_path_factory):
    stack = start_stack(tiny_qwen3, tmp_path_factory, restart_workers=True)
    try:
        for name in ("prefill-0", "decode-0"):  # the only worker of its role: requests need it back
            kill_and_wait_back(stack, name)
            ids = sorted(i.instance_id for i in list_instances(stack.controller_address))
            assert ids == ["decode-0", "prefill-0"]  # the same instance ids, no stray registration
            response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat(stack), timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
            _, chunks, payloads = stream_chat(stack.base_url, chat(stack))
            assert payloads[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"]
        assert [r.name for r in stack.restarts] == ["prefill-0", "decode-0"]
    finally:
        stack.stop()


def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def test_stop_is_bounded_when_a_service_ignores_sigterm(tiny_qwen3, tmp_path_factory, caplog):
    stack = start_stack(tiny_qwen3, tmp_path_factory, restart_workers=True)
    pids = {name: stack.pid(name) for name in stack.processes}
    # a stopped process leaves SIGTERM pending and never acts on it: only SIGKILL ends it
    stack.kill("decode-0", signal.SIGSTOP)
    timeout_s = 2.0
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pdmesh.launcher"):
        stack.stop(timeout_s=timeout_s)
    took = time.monotonic() - started
    assert took < timeout_s + KILL_WAIT_S, f"stop() took {took:.1f}s"
    assert all(_gone(pid) for pid in pids.values()), {n: p for n, p in pids.items() if not _gone(p)}
    assert f"decode-0 (pid {pids['decode-0']}) did not stop within" in caplog.text
    assert stack.restarts == []  # the supervisor stopped first: nothing restarted during the stop


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry))
    return found


def test_stop_after_a_failed_start_leaves_no_process(tmp_path):
    empty = tmp_path / "no-model"
    empty.mkdir()
    stack = LocalStack(
        StackSpec(model_dir=empty, http_port=0, log_dir=tmp_path / "logs", restart_workers=True)
    )
    with pytest.raises(RuntimeError, match="exited with code"):
        stack.start()
    assert stack.redis_url is not None
    # every service's command line names the model directory or the stack's own Redis
    assert _processes_mentioning(str(empty)) == []
    assert _processes_mentioning(stack.redis_url) == []
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(stack.redis_url, socket_connect_timeout=2).ping()
