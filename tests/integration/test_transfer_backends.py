"""Every transfer backend this host can run, with its server in another process (spawn).

Parametrized over ``tcp``, ``shm``, ``device`` (gloo) and ``mooncake`` (Mooncake TCP; ``make test``
installs its wheel and ``libibverbs1``): exact bytes into scattered destination
blocks, a layout mismatch refused naming the field, and a server killed mid-transfer failing the
pull within a bound. ``device``/nccl and ``cuda_ipc`` need GPUs and are skipped with the reason.
Speed is the benchmark's business; the last test only checks that it runs and what it reports.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch

from pdmesh.kv.transfer.base import allocate_pool, make_transfer_client, make_transfer_server
from pdmesh.kv.transfer.errors import TransferError
from pdmesh.kv.types import KVHandle, KVLayout
from tests.integration.transfer_harness import SpawnedServer, publish_and_wait

pytestmark = pytest.mark.timeout(90)

SEED = 99
NUM_BLOCKS = 48
LAYOUT = KVLayout("tiny", "mha", 2, 2, 8, 16, "float32", (2, 2, 16, 2, 8))
SCATTERED = [5, 6, 7, 20, 3, 40, 41, 47]
SLOW_IDS = list(range(0, 40, 2))  # 20 separate runs
BACKENDS = ["tcp", "shm", "device", "mooncake"]
ACK_DELAYED = ("shm", "mooncake")  # the copy or read is not in Python: the server delays its ack instead


def seeded(num_blocks: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn((num_blocks, *LAYOUT.block_shape), generator=generator)


def _slow_down(backend: str, delay_s: float, underway) -> None:
    """Makes the server pause ``delay_s`` per run of blocks (tcp, device) or before its ack (shm, mooncake).

    ``underway`` (an event) is set once a pull is in progress: a first run sent (tcp; device, whose
    group has formed by then), or the client's copy done and the ack held back (shm, mooncake)."""
    if backend in ACK_DELAYED:
        import pdmesh.kv.transfer.mooncake as mooncake
        import pdmesh.kv.transfer.shm as shm

        (shm if backend == "shm" else mooncake).before_ack = lambda: (underway.set(), time.sleep(delay_s))
        return
    import pdmesh.kv.transfer.device as device
    import pdmesh.kv.transfer.tcp as tcp

    mod = tcp if backend == "tcp" else device
    original = mod.send_run
    mod.send_run = lambda *args: (time.sleep(delay_s), original(*args), underway.set())


def serve(conn, backend: str, exposed: dict, delay_s: float, device: str, underway) -> None:
    """Child process: a ``backend`` server over the seeded pool until told to stop."""
    if delay_s:
        _slow_down(backend, delay_s, underway)
    pool = allocate_pool(backend, NUM_BLOCKS, LAYOUT, name=f"test-{uuid.uuid4().hex[:12]}", device=device)
    pool.copy_(seeded(NUM_BLOCKS).to(device))
    server = make_transfer_server(backend, pool, LAYOUT, "127.0.0.1", 0)
    server.start()
    publish_and_wait(server, exposed, conn)
    os._exit(0)  # skip interpreter teardown (process groups with live threads)


class Server(SpawnedServer):
    """A spawned ``serve`` process of ``backend``."""

    def __init__(self, backend: str, exposed: dict, delay_s: float = 0.0, device: str = "cpu") -> None:
        self.underway = mp.get_context("spawn").Event()
        super().__init__(serve, backend, exposed, delay_s, device, self.underway)


@pytest.fixture(scope="module")
def servers():
    """A plain and a slow server per backend, all started at once (each spawn imports torch)."""
    procs = {}
    for backend in BACKENDS:
        procs[backend] = Server(backend, {"h-scattered": SCATTERED, "h-single": [0]})
        procs[f"{backend}-slow"] = Server(
            backend, {"h-slow": SLOW_IDS}, delay_s=0.1 if backend not in ACK_DELAYED else 5
        )
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def handle_for(endpoint: str, handle_id: str, block_ids: list[int], layout: KVLayout = LAYOUT) -> KVHandle:
    return KVHandle(handle_id, handle_id, "p0", endpoint, list(block_ids), 16, layout, time.time() + 60)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pull_scattered_blocks_exactly(servers, backend: str) -> None:
    dst_ids = [10, 2, 33, 34, 35, 44, 9, 11]
    pool = torch.zeros((NUM_BLOCKS, *LAYOUT.block_shape))
    client = make_transfer_client(backend, pool, LAYOUT)
    for _ in range(2):  # the second pull reuses the connection, group or mapping
        pool.zero_()
        client.pull(handle_for(servers[backend].endpoint, "h-scattered", SCATTERED), dst_ids, timeout_s=30)
        assert torch.equal(bits(pool[dst_ids]), bits(seeded(NUM_BLOCKS)[SCATTERED]))
        untouched = [b for b in range(NUM_BLOCKS) if b not in dst_ids]
        assert torch.count_nonzero(pool[untouched]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_mismatch_refused_naming_the_field(servers, backend: str) -> None:
    other = dataclasses.replace(LAYOUT, model="other-model")
    client = make_transfer_client(backend, torch.zeros((8, *other.block_shape)), other)
    with pytest.raises(TransferError, match="model is 'tiny' here but 'other-model'"):
        client.pull(handle_for(servers[backend].endpoint, "h-single", [0], other), [1], timeout_s=30)
    with pytest.raises(TransferError, match="num_layers"):  # the handle's layout, before connecting
        client.pull(
            handle_for(servers[backend].endpoint, "h", [0], dataclasses.replace(other, num_layers=3)), [1], 5
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_handle_refused(servers, backend: str) -> None:
    client = make_transfer_client(backend, torch.zeros((8, *LAYOUT.block_shape)), LAYOUT)
    with pytest.raises(TransferError, match="'h-unknown' is not exposed"):
        client.pull(handle_for(servers[backend].endpoint, "h-unknown", [0]), [0], timeout_s=30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_killed_mid_transfer_fails_within_a_bound(servers, backend: str) -> None:
    proc = servers[f"{backend}-slow"]
    client = make_transfer_client(backend, torch.zeros((NUM_BLOCKS, *LAYOUT.block_shape)), LAYOUT)
    endpoint, outcome = proc.endpoint, {}

    def pull() -> None:
        try:
            client.pull(handle_for(endpoint, "h-slow", SLOW_IDS), list(range(len(SLOW_IDS))), timeout_s=30)
            outcome["error"] = None
        except TransferError as exc:
            outcome["error"] = exc
        outcome["done"] = time.monotonic()

    thread = threading.Thread(target=pull)
    thread.start()
    assert proc.underway.wait(30), "the pull never got under way"
    assert thread.is_alive(), "the pull finished before the server was killed"
    killed = time.monotonic()
    os.kill(proc.process.pid, signal.SIGKILL)
    thread.join(15)
    assert not thread.is_alive()
    assert isinstance(outcome["error"], TransferError)
    assert outcome["done"] - killed < 10.0
    with pytest.raises(TransferError):  # and the next pull fails fast too
        client.pull(handle_for(endpoint, "h-slow", SLOW_IDS), list(range(len(SLOW_IDS))), timeout_s=5)


def test_shm_needs_a_shared_pool() -> None:
    with pytest.raises(ValueError, match="allocate_pool"):
        make_transfer_server("shm", torch.zeros((4, *LAYOUT.block_shape)), LAYOUT, "127.0.0.1")


@pytest.mark.gpu
def test_device_nccl_between_two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(
            f"NCCL refuses two ranks on one GPU: needs 2 CUDA devices, found {torch.cuda.device_count()}"
        )
    proc = Server("device", {"h-scattered": SCATTERED}, device="cuda:0")
    try:
        pool = torch.zeros((NUM_BLOCKS, *LAYOUT.block_shape), device="cuda:1")
        client = make_transfer_client("device", pool, LAYOUT)
        client.pull(handle_for(proc.endpoint, "h-scattered", SCATTERED), list(range(8)), timeout_s=60)
        assert torch.equal(pool[:8].cpu(), seeded(NUM_BLOCKS)[SCATTERED])
    finally:
        proc.stop()


@pytest.mark.gpu
def test_cuda_ipc_pull() -> None:
    if not torch.cuda.is_available():
        pytest.skip("cuda_ipc needs a CUDA GPU; none here")
    layout = LAYOUT
    pool = seeded(NUM_BLOCKS).cuda()
    server = make_transfer_server("cuda_ipc", pool, layout, "127.0.0.1", 0)
    server.start()
    try:
        server.expose("h", SCATTERED)
        dst = torch.zeros_like(pool)
        make_transfer_client("cuda_ipc", dst, layout).pull(
            handle_for(server.endpoint, "h", SCATTERED), list(range(8)), 30
        )
        assert torch.equal(dst[:8].cpu(), pool[SCATTERED].cpu())
    finally:
        server.stop()


def test_bench_smoke(capsys) -> None:
    from pdmesh.bench.transfer import main

    assert main(["--backend", "tcp", "--mib", "8", "--reps", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    for key in (
        "backend", "mib", "gbytes_per_s", "baseline_socket_gbytes_per_s", "baseline_memcpy_gbytes_per_s",
        "ratio_to_socket", "ratio_to_memcpy", "pull_latency_ms_2k_tokens",
    ):  # fmt: skip
        assert key in result
    assert result["backend"] == "tcp" and result["mib"] == 8 and result["gbytes_per_s"] > 0
    assert result["handle_secret"]["ratio_to_unauthenticated"] > 0  # the secret's cost, measured
    assert main(["--backend", "nope"]) == 2
    assert "error" in capsys.readouterr().err


def test_bench_mooncake_smoke(capsys) -> None:
    from pdmesh.bench.transfer import main

    assert main(["--backend", "mooncake", "--mib", "4", "--reps", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert result["backend"] == "mooncake" and result["gbytes_per_s"] > 0


def test_mooncake_without_the_wheel_names_the_package(monkeypatch) -> None:
    import pdmesh.kv.transfer.base as base

    monkeypatch.setitem(sys.modules, "mooncake.engine", None)  # its import now fails, as without the wheel
    assert "mooncake" not in base.BACKENDS
    pool = torch.zeros((4, *LAYOUT.block_shape))
    with pytest.raises(ValueError, match="mooncake-transfer-engine-non-cuda"):
        base.make_transfer_client("mooncake", pool, LAYOUT)
    with pytest.raises(ValueError, match="mooncake-transfer-engine-non-cuda"):
        base.allocate_pool("mooncake", 4, LAYOUT)


def test_importing_the_backend_table_imports_no_backend() -> None:
    """A worker that runs tcp never loads Mooncake's engine (nor any other backend's module)."""
    probe = (
        "import sys, pdmesh.kv.transfer.base as base; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mooncake' "
        "or m in {r.module for r in base.TABLE.values()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
