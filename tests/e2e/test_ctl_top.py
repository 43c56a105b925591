"""`pdmesh ctl top` against a real stack: a frame lists every instance with its role and state,
the ratio, and (with --coordinator) the request rate and latency percentiles after real requests;
without --once it keeps refreshing until Ctrl-C; a killed worker leaves it; bad input and an
unreachable controller get one line and exit 2 and 1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import pytest

from pdmesh.launcher import ROOT
from pdmesh.ports import free_port
from pdmesh.rpc.convert_cluster import instance_from_proto
from tests.e2e.conftest import start_stack
from tests.e2e.helpers import list_instances, wait_until

pytestmark = pytest.mark.timeout(240)

HEALTH = {
    "heartbeat-interval-s": "0.2",
    "suspect-after-s": "1.5",
    "dead-after-s": "3",
    "probe-interval-s": "0.5",
}
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def stack(tiny_qwen3, tmp_path_factory):
    stack = start_stack(tiny_qwen3, tmp_path_factory, prefill=2, decode=1, mode="pd", controller_args=HEALTH)
    try:
        yield stack
    finally:
        stack.stop()


def ctl_argv(controller: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "pdmesh.cli", "ctl", "--controller", controller, *args]


def top(controller: str, *args: str) -> subprocess.CompletedProcess:
    argv = ctl_argv(controller, "top", *args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=ENV, cwd=ROOT)


def rows(frame: str) -> dict[str, list[str]]:
    """Instance id -> the other columns of its line in the frame."""
    out = {}
    for line in frame.splitlines():
        parts = line.split()
        if parts and re.fullmatch(r"(prefill|decode|mixed)-\S+", parts[0]):
            out[parts[0]] = parts[1:]
    return out


def test_once_lists_every_instance_with_its_role(stack):
    done = top(stack.controller_address, "--once")
    assert done.returncode == 0, done.stderr
    listed = rows(done.stdout)
    instances = [instance_from_proto(m) for m in list_instances(stack.controller_address)]
    assert set(listed) == {i.instance_id for i in instances}
    for i in instances:
        role, state, running, waiting, kv, used = listed[i.instance_id]
        assert (role, state) == (i.role, i.state)
        free, total = (int(n) for n in kv.split("/"))
        assert 0 < total and 0 <= free <= total and used.endswith("%")
    assert "ratio off" in done.stdout and "instances: 1 decode healthy, 2 prefill healthy" in done.stdout


def test_with_coordinator_shows_rate_and_latency_after_requests(stack):
    model = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": "The mesh", "max_tokens": 6, "temperature": 0, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", f"{stack.base_url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            response.read()
    done = top(stack.controller_address, "--once", "--coordinator", stack.base_url)
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("requests/s"))
    assert float(line.split()[1]) > 0
    ttft = re.search(r"TTFT p50 (\S+) p90 (\S+) p99 (\S+)", line)
    assert ttft and all(re.fullmatch(r"\d+(\.\d)?ms", v) for v in ttft.groups()), line
    assert re.search(r"ITL p50 [\d.]+ms p99 [\d.]+ms", line), line
    assert len(rows(done.stdout)) == 3


def test_refreshes_until_ctrl_c(stack):
    argv = ctl_argv(stack.controller_address, "top", "--interval-s", "0.2")
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
        # as from a terminal: a run started in the background by a non-interactive shell (CI) inherits
        # SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        frames = 0
        for line in proc.stdout:
            frames += line.startswith("pdmesh top")
            if frames == 3:
                break
        assert frames == 3, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_bad_input_and_unreachable_controller(stack):
    for args, problem in (
        (("--interval-s", "0"), "--interval-s"),
        (("--interval-s", "soon"), "--interval-s"),
        (("--coordinator", "localhost:8000"), "--coordinator"),
    ):
        done = top(stack.controller_address, "--once", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert problem in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = top(f"127.0.0.1:{free_port()}", "--once")
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    unreachable = f"http://127.0.0.1:{free_port()}"
    done = top(stack.controller_address, "--once", "--coordinator", unreachable)
    assert done.returncode == 1 and unreachable in done.stderr, done.stderr


def test_killed_worker_leaves_the_view(stack):
    """Last: it takes an instance away from the module's stack. A dead instance leaves the
    controller's list (it was suspect in between), so the frame stops listing it."""
    stack.kill("prefill-1")

    def gone() -> bool:
        frame = top(stack.controller_address, "--once").stdout
        return set(rows(frame)) == {"prefill-0", "decode-0"} and "1 prefill healthy" in frame

    wait_until(gone, timeout_s=30, what="prefill-1 gone from the frame")
