"""Benchmark of a transfer backend against a plain socket stream and a memcpy, all in one run.

``pdmesh bench transfer --backend tcp --mib 64 --json`` (or ``python -m pdmesh.bench.transfer``).
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

Every pull presents its handle's secret, as a worker's do (``wire.ExposedTable``: the plaintext
pulls are those of ``kv_transfer_security: secret``); ``handle_secret.ratio_to_unauthenticated``
compares them with pulls of the same blocks exposed without one, interleaved too.

``--tls`` adds the same pulls over mutual TLS (``pdmesh.kv.transfer.secure``; a CA and a worker
certificate written to a temporary directory with ``write_certs``) from a second server of the
same process, interleaved with the plaintext ones: ``tls.gbytes_per_s`` and ``tls.ratio_to_plain``.
``cpu`` lists the CPU's vector extensions (AES-GCM's speed follows AVX2/AVX-512 and VAES).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from pdmesh.bench.host import host_info
from pdmesh.kv.transfer import hostmem, secure
from pdmesh.kv.transfer.base import BACKENDS, allocate_pool, make_transfer_client, make_transfer_server
from pdmesh.kv.types import KVHandle, KVLayout
from pdmesh.security.certs import write_certs
from pdmesh.security.tls import TlsFiles

QWEN3_58M = KVLayout("qwen3-58m", "mha", 8, 4, 64, 16, "float32", (8, 2, 16, 4, 64))
TOKENS_2K_BLOCKS = 2048 // QWEN3_58M.block_size
MiB = 1 << 20
BENCH_SECRET = "bench-handle-secret"  # a worker draws one per handle (secrets.token_urlsafe)


class _BadFlags(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, from main()
        raise _BadFlags(message)


def _serve(backend: str, num_blocks: int, bulk: int, conn, tls: TlsFiles | None) -> None:
    """Child process: a server over a random pool exposing ``bulk`` blocks and a 2k-token request,
    and with ``tls`` a second one over a pool of the same bytes under mutual TLS."""
    torch.set_num_threads(1)
    servers, endpoints, checksum = [], [], 0.0
    for name, context in (("plain", None), ("tls", secure.contexts(tls)[0] if tls else None)):
        if name == "tls" and tls is None:
            break
        pool = allocate_pool(backend, num_blocks, QWEN3_58M, name=f"bench-{name}-{os.getpid()}")
        pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(7)))
        server = make_transfer_server(backend, pool, QWEN3_58M, "127.0.0.1", 0, context)
        server.start()
        server.expose("bulk", list(range(bulk)), BENCH_SECRET)
        server.expose("bulk-open", list(range(bulk)))
        server.expose("2k", list(range(bulk, bulk + TOKENS_2K_BLOCKS)), BENCH_SECRET)
        servers.append((server, pool))  # a shm segment lives as long as its pool
        endpoints.append(server.endpoint)
        checksum = float(pool[:bulk].double().sum())
    conn.send((endpoints, checksum))
    try:
        conn.recv()
    except EOFError:
        pass
    for server, _ in servers:
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


class _Decode:
    """The decode end of one server: a pool from ``allocate_pool``, as in a worker, its client and
    the handles (``bulk_open``: the bulk blocks without a secret)."""

    def __init__(self, backend: str, endpoint: str, bulk: int, name: str, context) -> None:
        self.pool = allocate_pool(backend, bulk + TOKENS_2K_BLOCKS, QWEN3_58M, name=name)
        self.client = make_transfer_client(backend, self.pool, QWEN3_58M, context)
        expiry = time.time() + 3600
        self.bulk_ids = list(range(bulk))
        self.ids_2k = list(range(bulk, bulk + TOKENS_2K_BLOCKS))
        self.bulk = KVHandle(
            "bulk", "bulk", "bench", endpoint, self.bulk_ids, 0, QWEN3_58M, expiry, secret=BENCH_SECRET
        )
        self.bulk_open = KVHandle("bulk-open", "bulk", "bench", endpoint, self.bulk_ids, 0, QWEN3_58M, expiry)
        self.handle_2k = KVHandle(
            "2k", "2k", "bench", endpoint, [], 2048, QWEN3_58M, expiry, secret=BENCH_SECRET
        )
        self.client.pull(self.bulk, self.bulk_ids, timeout_s=120)  # warm-up: connections, groups, mappings

    def pull_bulk(self) -> float:
        return _timed_pulls(self.client, self.bulk, self.bulk_ids, 1)[0]

    def pull_bulk_open(self) -> float:
        return _timed_pulls(self.client, self.bulk_open, self.bulk_ids, 1)[0]

    def check(self, checksum: float) -> None:
        if abs(float(self.pool[: len(self.bulk_ids)].double().sum()) - checksum) > 1e-6 * max(
            1.0, abs(checksum)
        ):
            raise RuntimeError("the pulled blocks differ from the server's")

    def latency(self, reps: int) -> float:
        """Median seconds of a 2k-token pull."""
        self.client.pull(self.handle_2k, self.ids_2k, timeout_s=120)  # warm-up: first touch of these blocks
        return statistics.median(_timed_pulls(self.client, self.handle_2k, self.ids_2k, reps))

    def close(self) -> None:
        getattr(self.client, "close", lambda: None)()


def _worker_files(out_dir: str) -> TlsFiles:
    paths = write_certs(out_dir)
    return TlsFiles(ca=str(paths.ca), cert=str(paths.cert("worker")), key=str(paths.key("worker")))


def run(backend: str, mib: int, reps: int, tls: bool = False) -> dict:
    """Measures ``backend`` (plaintext, and with ``tls`` over mutual TLS too) and the baselines; the
    result is what ``--json`` prints."""
    with tempfile.TemporaryDirectory(prefix="pdmesh-bench-tls-") as tmp:
        return _run(backend, mib, reps, _worker_files(tmp) if tls else None)


def _run(backend: str, mib: int, reps: int, tls: TlsFiles | None) -> dict:
    bulk = max(1, mib * MiB // QWEN3_58M.block_nbytes)
    nbytes = bulk * QWEN3_58M.block_nbytes
    parent, child_conn = mp.get_context("spawn").Pipe()
    server = mp.get_context("spawn").Process(
        target=_serve, args=(backend, bulk + TOKENS_2K_BLOCKS, bulk, child_conn, tls), daemon=True
    )
    server.start()
    stream = SocketStream(nbytes, reps)
    # the same plain stream received into memory like a CPU pool's (huge pages, hostmem)
    stream_pool_memory = SocketStream(nbytes, reps, into=hostmem.zeros((nbytes,), torch.uint8))
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    memcpy_once(src, dst)
    sides: dict[str, _Decode] = {}
    try:
        if not parent.poll(120):
            raise RuntimeError("the benchmark's transfer server did not start")
        endpoints, checksum = parent.recv()
        contexts = {"pull": None, "pull_tls": secure.contexts(tls)[1] if tls else None}
        for (name, context), endpoint in zip(contexts.items(), endpoints, strict=False):
            sides[name] = _Decode(backend, endpoint, bulk, f"bench-dst-{name}-{os.getpid()}", context)
        measures = {name: side.pull_bulk for name, side in sides.items()}
        measures.update(
            pull_open=sides["pull"].pull_bulk_open,
            socket=stream.once,
            socket_pool_memory=stream_pool_memory.once,
            memcpy=lambda: memcpy_once(src, dst),
        )
        times = _interleaved(measures, reps)
        for side in sides.values():
            side.check(checksum)
        latency = {name: side.latency(reps) for name, side in sides.items()}
    finally:
        for side in sides.values():
            side.close()
        stream.close()
        stream_pool_memory.close()
        parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.kill()
    return _result(
        backend, nbytes, reps, {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}, latency
    )


def _result(backend: str, nbytes: int, reps: int, gbps: dict[str, float], latency: dict[str, float]) -> dict:
    result = {
        "backend": backend,
        "mib": round(nbytes / MiB, 3),
        "reps": reps,
        "gbytes_per_s": round(gbps["pull"], 3),
        "baseline_socket_gbytes_per_s": round(gbps["socket"], 3),
        "baseline_socket_pool_memory_gbytes_per_s": round(gbps["socket_pool_memory"], 3),
        "baseline_memcpy_gbytes_per_s": round(gbps["memcpy"], 3),
        "ratio_to_socket": round(gbps["pull"] / gbps["socket"], 3),
        "ratio_to_socket_pool_memory": round(gbps["pull"] / gbps["socket_pool_memory"], 3),
        "ratio_to_memcpy": round(gbps["pull"] / gbps["memcpy"], 3),
        "pull_latency_ms_2k_tokens": round(latency["pull"] * 1e3, 3),
        "handle_secret": {
            "unauthenticated_gbytes_per_s": round(gbps["pull_open"], 3),
            "ratio_to_unauthenticated": round(gbps["pull"] / gbps["pull_open"], 3),
        },
        "layout_2k": {
            "block_shape": list(QWEN3_58M.block_shape),
            "dtype": QWEN3_58M.dtype,
            "blocks": TOKENS_2K_BLOCKS,
        },
        **host_info(),
    }
    if "pull_tls" in gbps:
        result["tls"] = {
            "gbytes_per_s": round(gbps["pull_tls"], 3),
            "ratio_to_plain": round(gbps["pull_tls"] / gbps["pull"], 3),
            "ratio_to_socket": round(gbps["pull_tls"] / gbps["socket"], 3),
            "pull_latency_ms_2k_tokens": round(latency["pull_tls"] * 1e3, 3),
            "openssl": ssl.OPENSSL_VERSION,
        }
    return result


def _parser() -> _Parser:
    parser = _Parser(prog="pdmesh bench transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="tcp", choices=[b for b in BACKENDS if b != "cuda_ipc"])
    parser.add_argument("--mib", type=int, default=64, help="MiB pulled per repetition (contiguous blocks)")
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions (the median is reported)")
    parser.add_argument("--tls", action="store_true", help="also pull over mutual TLS and compare (tls.*)")
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
    result = run(args.backend, args.mib, args.reps, args.tls)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['backend']}: {result['mib']} MiB at {result['gbytes_per_s']} GB/s "
            f"({result['ratio_to_socket']}x a plain socket at {result['baseline_socket_gbytes_per_s']} GB/s, "
            f"{result['ratio_to_memcpy']}x memcpy at {result['baseline_memcpy_gbytes_per_s']} GB/s); "
            f"2k-token pull {result['pull_latency_ms_2k_tokens']} ms"
        )
        if "tls" in result:
            tls = result["tls"]
            print(
                f"{result['backend']} over TLS: {tls['gbytes_per_s']} GB/s ({tls['ratio_to_plain']}x plaintext); "
                f"2k-token pull {tls['pull_latency_ms_2k_tokens']} ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
