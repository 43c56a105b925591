"""The tcp transfer backend with the server in another process (spawn), as between two workers."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pdmesh.kv.transfer.base import make_transfer_client
from pdmesh.kv.transfer.errors import TransferError
from pdmesh.kv.types import KVHandle, KVLayout
from tests.integration.transfer_harness import SpawnedServer, publish_and_wait

pytestmark = pytest.mark.timeout(60)

SEED = 1234
NUM_BLOCKS = 64
LAYOUT = KVLayout("tiny", "mha", 2, 2, 8, 16, "float32", (2, 2, 16, 2, 8))
EXPOSED = {
    "h-scattered": [5, 6, 7, 20, 3, 40, 41, 63],
    "h-single": [0],
    **{
        f"h-{i}": [i * 7 % NUM_BLOCKS, (i * 7 + 1) % NUM_BLOCKS, (i * 13 + 30) % NUM_BLOCKS] for i in range(8)
    },
}


def make_pool(layout: KVLayout, num_blocks: int, seed: int) -> torch.Tensor:
    """The same random pool in every process for the same arguments."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn((num_blocks, *layout.block_shape), generator=generator, dtype=torch.float32)
    return values.to(getattr(torch, layout.dtype)).contiguous()


def serve(
    conn, layout_dict: dict, num_blocks: int, seed: int, exposed: dict, send_delay_s: float, sent
) -> None:
    """Child process: a transfer server over a seeded pool until told to stop (or the pipe closes).

    With ``send_delay_s`` every run of blocks waits that long before it is sent, and ``sent`` (an
    event) is set once a run has gone out: the parent's sign that a pull is under way."""
    import pdmesh.kv.transfer.tcp as tcp

    if send_delay_s:
        original = tcp.send_run

        def slow_send(sock, view):
            time.sleep(send_delay_s)
            original(sock, view)
            sent.set()

        tcp.send_run = slow_send
    layout = KVLayout.from_dict(layout_dict)
    server = tcp.TcpTransferServer(make_pool(layout, num_blocks, seed), layout, "127.0.0.1", 0)
    server.start()
    publish_and_wait(server, exposed, conn)
    server.stop()


class ServerProcess(SpawnedServer):
    """A spawned ``serve`` process and its endpoint."""

    def __init__(
        self, layout: KVLayout, exposed: dict, send_delay_s: float = 0.0, num_blocks: int = NUM_BLOCKS
    ):
        self.sent = mp.get_context("spawn").Event()
        args = (layout.to_dict(), num_blocks, SEED, exposed, send_delay_s, self.sent)
        super().__init__(serve, *args, start_timeout_s=30)


BF16 = dataclasses.replace(LAYOUT, dtype="bfloat16")
BIG_IDS = list(range(0, NUM_BLOCKS, 2))  # 32 separate runs


@pytest.fixture(scope="module")
def servers():
    """Every server process this module needs, started together (each spawn imports torch)."""
    procs = {
        "main": ServerProcess(LAYOUT, EXPOSED),
        "bf16": ServerProcess(BF16, {"h-bf16": [9, 1, 2, 3, 60]}),
        "slow": ServerProcess(LAYOUT, {"h-big": BIG_IDS}, send_delay_s=0.1),  # each run sent 0.1 s apart
        "stall": ServerProcess(LAYOUT, {"h-stall": [1, 3]}, send_delay_s=20),
    }
    try:
        for proc in procs.values():
            assert proc.endpoint.startswith("tcp://127.0.0.1:")
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


def handle_for(endpoint: str, handle_id: str, block_ids: list[int], layout: KVLayout = LAYOUT) -> KVHandle:
    return KVHandle(
        handle_id,
        handle_id,
        "prefill-0",
        endpoint,
        list(block_ids),
        16 * len(block_ids),
        layout,
        time.time() + 30,
    )


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    return (
        tensor.view(torch.int16)
        if tensor.dtype in (torch.bfloat16, torch.float16)
        else tensor.view(torch.int32)
    )


def test_pull_scattered_blocks_into_scattered_blocks(server: ServerProcess) -> None:
    src_ids = EXPOSED["h-scattered"]
    dst_ids = [10, 2, 33, 34, 35, 50, 9, 11]
    pool = torch.zeros((NUM_BLOCKS, *LAYOUT.block_shape))
    client = make_transfer_client("tcp", pool, LAYOUT)
    client.pull(handle_for(server.endpoint, "h-scattered", src_ids), dst_ids, timeout_s=10)
    expected = make_pool(LAYOUT, NUM_BLOCKS, SEED)
    assert torch.equal(as_bits(pool[dst_ids]), as_bits(expected[src_ids]))
    untouched = [b for b in range(NUM_BLOCKS) if b not in dst_ids]
    assert torch.count_nonzero(pool[untouched]) == 0


def test_layout_mismatch_refused_by_the_server_naming_the_field(server: ServerProcess) -> None:
    other = dataclasses.replace(LAYOUT, model="other-model")
    client = make_transfer_client("tcp", torch.zeros((8, *other.block_shape)), other)
    with pytest.raises(TransferError, match="refused.*model is 'tiny' here but 'other-model'"):
        client.pull(handle_for(server.endpoint, "h-single", [0], other), [1], timeout_s=10)


def test_layout_mismatch_with_the_handle_refused_before_connecting() -> None:
    other = dataclasses.replace(LAYOUT, num_layers=3)
    client = make_transfer_client("tcp", torch.zeros((8, *LAYOUT.block_shape)), LAYOUT)
    with pytest.raises(TransferError, match="num_layers"):
        client.pull(handle_for("tcp://127.0.0.1:1", "h", [0], other), [1], timeout_s=10)


def test_unknown_handle_refused(server: ServerProcess) -> None:
    client = make_transfer_client("tcp", torch.zeros((8, *LAYOUT.block_shape)), LAYOUT)
    with pytest.raises(TransferError, match="'h-unknown' is not exposed"):
        client.pull(handle_for(server.endpoint, "h-unknown", [0, 1]), [0, 1], timeout_s=10)


def test_block_count_mismatch_refused(server: ServerProcess) -> None:
    client = make_transfer_client("tcp", torch.zeros((8, *LAYOUT.block_shape)), LAYOUT)
    with pytest.raises(TransferError, match="holds 8 blocks.*but 2 destination blocks"):
        client.pull(handle_for(server.endpoint, "h-scattered", [0, 1]), [0, 1], timeout_s=10)


def test_nobody_listening_fails_fast() -> None:
    client = make_transfer_client("tcp", torch.zeros((8, *LAYOUT.block_shape)), LAYOUT)
    with pytest.raises(TransferError, match="failed"):
        client.pull(handle_for("tcp://127.0.0.1:1", "h", [0]), [0], timeout_s=5)


def test_concurrent_pulls_from_many_threads(server: ServerProcess) -> None:
    pool = torch.zeros((NUM_BLOCKS, *LAYOUT.block_shape))
    client = make_transfer_client("tcp", pool, LAYOUT)
    jobs = [(f"h-{i}", EXPOSED[f"h-{i}"], [3 * i, 3 * i + 1, 40 + i]) for i in range(8)]

    def pull(job) -> None:
        handle_id, src_ids, dst_ids = job
        for _ in range(5):
            client.pull(handle_for(server.endpoint, handle_id, src_ids), dst_ids, timeout_s=10)

    with ThreadPoolExecutor(8) as executor:
        list(executor.map(pull, jobs))
    expected = make_pool(LAYOUT, NUM_BLOCKS, SEED)
    for _, src_ids, dst_ids in jobs:
        assert torch.equal(as_bits(pool[dst_ids]), as_bits(expected[src_ids]))


def test_bfloat16_pool(servers) -> None:
    layout, proc = BF16, servers["bf16"]
    pool = torch.zeros((NUM_BLOCKS, *layout.block_shape), dtype=torch.bfloat16)
    client = make_transfer_client("tcp", pool, layout)
    client.pull(
        handle_for(proc.endpoint, "h-bf16", [9, 1, 2, 3, 60], layout), [4, 5, 30, 31, 0], timeout_s=10
    )
    expected = make_pool(layout, NUM_BLOCKS, SEED)
    assert torch.equal(as_bits(pool[[4, 5, 30, 31, 0]]), as_bits(expected[[9, 1, 2, 3, 60]]))


def test_server_killed_mid_transfer_fails_promptly(servers) -> None:
    src_ids, proc = BIG_IDS, servers["slow"]  # 32 runs sent 0.1 s apart: over 3 s in all
    client = make_transfer_client("tcp", torch.zeros((NUM_BLOCKS, *LAYOUT.block_shape)), LAYOUT)
    outcome: dict = {}

    def pull() -> None:
        try:
            client.pull(handle_for(proc.endpoint, "h-big", src_ids), list(range(32)), timeout_s=30)
            outcome["error"] = None
        except TransferError as exc:
            outcome["error"] = exc
        outcome["done"] = time.monotonic()

    thread = threading.Thread(target=pull)
    thread.start()
    assert proc.sent.wait(10), "the server sent nothing"  # the pull is under way: 31 runs still to go
    assert thread.is_alive(), "the pull finished before the server was killed"
    killed = time.monotonic()
    os.kill(proc.process.pid, signal.SIGKILL)
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(outcome["error"], TransferError)
    assert outcome["done"] - killed < 5.0


def test_stalled_server_hits_the_timeout(servers) -> None:
    proc = servers["stall"]
    client = make_transfer_client("tcp", torch.zeros((8, *LAYOUT.block_shape)), LAYOUT)
    started = time.monotonic()
    with pytest.raises(TransferError, match="timed out"):
        client.pull(handle_for(proc.endpoint, "h-stall", [1, 3]), [0, 2], timeout_s=1.0)
    assert time.monotonic() - started < 3.0
