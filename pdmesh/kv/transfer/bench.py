"""Benchmark of a transfer backend against a plain socket stream and a memcpy, all in one run.

``pdmesh bench transfer --backend tcp --mib 64 --json`` (or ``python -m pdmesh.kv.transfer.bench``).
The prefill server runs in a spawned process, as between two workers on one host; the decode
client pulls ``--mib`` MiB of contiguous blocks of the 58M Qwen3 shape (8 layers, 4 KV heads of 64,
float32, block size 16: 256 KiB blocks) into a pool of this process; both pools come from
``allocate_pool``, as in a worker. Every figure is the median of ``--reps`` repetitions after a
warm-up. The baselines are measured in the same run, interleaved repetition by repetition with the
pulls (the order rotating): a plain Python socket stream over loopback between two processes
(``sendall`` of one buffer, ``recv_into`` a preallocated ``bytearray``), the same stream received into
memory allocated like a CPU pool's (``hostmem``: huge pages; ``*_socket_pool_memory``, so that the
pull's gain from its memory is told apart from the stream's) and a ``copy_`` between two CPU tensors
of the same size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable

import torch

from pdmesh.kv.transfer import hostmem
from pdmesh.kv.transfer.base import BACKENDS, allocate_pool, make_transfer_client, make_transfer_server
from pdmesh.kv.types import KVHandle, KVLayout

QWEN3_58M = KVLayout("qwen3-58m", "mha", 8, 4, 64, 16, "float32", (8, 2, 16, 4, 64))
TOKENS_2K_BLOCKS = 2048 // QWEN3_58M.block_size
MiB = 1 << 20


class _BadFlags(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, from main()
        raise _BadFlags(message)


def _serve(backend: str, num_blocks: int, bulk: int, conn) -> None:
    """Child process: a server over a random pool exposing ``bulk`` blocks and a 2k-token request."""
    torch.set_num_threads(1)
    pool = allocate_pool(backend, num_blocks, QWEN3_58M, name=f"bench-{os.getpid()}")
    pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(7)))
    server = make_transfer_server(backend, pool, QWEN3_58M, "127.0.0.1", 0)
    server.start()
    server.expose("bulk", list(range(bulk)))
    server.expose("2k", list(range(bulk, bulk + TOKENS_2K_BLOCKS)))
    conn.send((server.endpoint, float(pool[:bulk].double().sum())))
    try:
        conn.recv()
    except EOFError:
        pass
    server.stop()
    os._exit(0)  # skip interpreter teardown (a device group's threads may still be live)


def _socket_sender(port: int, nbytes: int, reps: int) -> None:
    """Child process: sends ``nbytes`` each time the parent asks."""
    data = bytearray(nbytes)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(reps):
            sock.recv(1)
            sock.sendall(data)


class SocketStream:
    """A plain socket stream over loopback from another process: ``once()`` times one transfer."""

    def __init__(self, nbytes: int, reps: int, into: torch.Tensor | None = None) -> None:
        self.nbytes = nbytes
        listener = socket.create_server(("127.0.0.1", 0))
        self.child = mp.get_context("spawn").Process(
            target=_socket_sender, args=(listener.getsockname()[1], nbytes, reps + 1), daemon=True
        )
        self.child.start()
        self.conn, _ = listener.accept()
        listener.close()
        # into: a uint8 tensor to receive into instead of a bytearray (e.g. the pool's kind of memory)
        self.view = memoryview(bytearray(nbytes)) if into is None else memoryview(into.numpy())
        self.once()  # warm-up

    def once(self) -> float:
        started = time.perf_counter()
        self.conn.sendall(b"x")
        got = 0
        while got < self.nbytes:
            got += self.conn.recv_into(self.view[got:])
        return time.perf_counter() - started

    def close(self) -> None:
        self.conn.close()
        self.child.join(10)


def memcpy_once(src: torch.Tensor, dst: torch.Tensor) -> float:
    started = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - started


def _timed_pulls(client, handle: KVHandle, dst_ids: list[int], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        client.pull(handle, dst_ids, timeout_s=120)
        times.append(time.perf_counter() - started)
    return times


def _interleaved(measures: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Times every measure once per repetition, rotating which goes first.

    Interleaved so that a noisy neighbour hits all of them alike; rotated so that none always runs
    right after the same other one (a memcpy, say, leaving the caches cold for what follows).
    """
    names = list(measures)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(measures[name]())
    return times


def run(backend: str, mib: int, reps: int) -> dict:
    """Measures ``backend`` and both baselines; the result is what ``--json`` prints."""
    bulk = max(1, mib * MiB // QWEN3_58M.block_nbytes)
    nbytes = bulk * QWEN3_58M.block_nbytes
    parent, child_conn = mp.get_context("spawn").Pipe()
    server = mp.get_context("spawn").Process(
        target=_serve, args=(backend, bulk + TOKENS_2K_BLOCKS, bulk, child_conn), daemon=True
    )
    server.start()
    stream = SocketStream(nbytes, reps)
    # the same plain stream received into memory like a CPU pool's (huge pages, hostmem)
    stream_pool_memory = SocketStream(nbytes, reps, into=hostmem.zeros((nbytes,), torch.uint8))
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    memcpy_once(src, dst)
    try:
        if not parent.poll(120):
            raise RuntimeError("the benchmark's transfer server did not start")
        endpoint, checksum = parent.recv()
        # the decode side's pool comes from allocate_pool, as in a worker
        pool = allocate_pool(backend, bulk + TOKENS_2K_BLOCKS, QWEN3_58M, name=f"bench-dst-{os.getpid()}")
        client = make_transfer_client(backend, pool, QWEN3_58M)
        expiry = time.time() + 3600
        bulk_handle = KVHandle("bulk", "bulk", "bench", endpoint, list(range(bulk)), 0, QWEN3_58M, expiry)
        client.pull(bulk_handle, list(range(bulk)), timeout_s=120)  # warm-up: connections, groups, mappings
        times = _interleaved(
            {
                "pull": lambda: _timed_pulls(client, bulk_handle, list(range(bulk)), 1)[0],
                "socket": stream.once,
                "socket_pool_memory": stream_pool_memory.once,
                "memcpy": lambda: memcpy_once(src, dst),
            },
            reps,
        )
        if abs(float(pool[:bulk].double().sum()) - checksum) > 1e-6 * max(1.0, abs(checksum)):
            raise RuntimeError("the pulled blocks differ from the server's")
        handle_2k = KVHandle("2k", "2k", "bench", endpoint, [], 2048, QWEN3_58M, expiry)
        dst_2k = list(range(bulk, bulk + TOKENS_2K_BLOCKS))
        client.pull(handle_2k, dst_2k, timeout_s=120)  # warm-up: first touch of these blocks
        latency_times = _timed_pulls(client, handle_2k, dst_2k, reps)
        getattr(client, "close", lambda: None)()
    finally:
        stream.close()
        stream_pool_memory.close()
        parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.kill()
    gbps, socket_gbps, socket_pool_gbps, memcpy_gbps = (
        nbytes / statistics.median(times[k]) / 1e9 for k in ("pull", "socket", "socket_pool_memory", "memcpy")
    )
    return {
        "backend": backend,
        "mib": round(nbytes / MiB, 3),
        "reps": reps,
        "gbytes_per_s": round(gbps, 3),
        "baseline_socket_gbytes_per_s": round(socket_gbps, 3),
        "baseline_socket_pool_memory_gbytes_per_s": round(socket_pool_gbps, 3),
        "baseline_memcpy_gbytes_per_s": round(memcpy_gbps, 3),
        "ratio_to_socket": round(gbps / socket_gbps, 3),
        "ratio_to_socket_pool_memory": round(gbps / socket_pool_gbps, 3),
        "ratio_to_memcpy": round(gbps / memcpy_gbps, 3),
        "pull_latency_ms_2k_tokens": round(statistics.median(latency_times) * 1e3, 3),
        "layout_2k": {
            "block_shape": list(QWEN3_58M.block_shape),
            "dtype": QWEN3_58M.dtype,
            "blocks": TOKENS_2K_BLOCKS,
        },
    }


def _parser() -> _Parser:
    parser = _Parser(prog="pdmesh bench transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="tcp", choices=[b for b in BACKENDS if b != "cuda_ipc"])
    parser.add_argument("--mib", type=int, default=64, help="MiB pulled per repetition (contiguous blocks)")
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions (the median is reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; 2 on bad flags (one line on stderr)."""
    try:
        args = _parser().parse_args(argv)
        if args.mib < 1 or args.reps < 1:
            raise _BadFlags("--mib and --reps must be at least 1")
    except _BadFlags as exc:
        print(f"pdmesh bench transfer: error: {exc}", file=sys.stderr)
        return 2
    result = run(args.backend, args.mib, args.reps)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['backend']}: {result['mib']} MiB at {result['gbytes_per_s']} GB/s "
            f"({result['ratio_to_socket']}x a plain socket at {result['baseline_socket_gbytes_per_s']} GB/s, "
            f"{result['ratio_to_memcpy']}x memcpy at {result['baseline_memcpy_gbytes_per_s']} GB/s); "
            f"2k-token pull {result['pull_latency_ms_2k_tokens']} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
