"""Micro-benchmark of a transfer backend: ``python -m pdmesh.kv.transfer.bench --blocks 256``.

Server and client run in this one process (the socket calls release the GIL) over loopback, so the
numbers are an upper bound for one host; run the server elsewhere for a network figure.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from pdmesh.kv.transfer.base import BACKENDS, make_transfer_client, make_transfer_server
from pdmesh.kv.types import KVHandle, KVLayout

log = logging.getLogger(__name__)


def bench_layout(block_kib: int, dtype: str) -> KVLayout:
    """A layout whose blocks are ``block_kib`` KiB of ``dtype``."""
    element = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    head_dim, block_size, heads = 128, 16, 1
    per_layer = 2 * block_size * heads * head_dim * element
    layers = max(1, block_kib * 1024 // per_layer)
    return KVLayout(
        "bench", "mha", layers, heads, head_dim, block_size, dtype, (layers, 2, block_size, heads, head_dim)
    )


def run(backend: str, num_blocks: int, block_kib: int, dtype: str, iters: int, scattered: bool) -> dict:
    """Pulls ``num_blocks`` blocks ``iters`` times and returns the timings."""
    layout = bench_layout(block_kib, dtype)
    src_pool = torch.randn((num_blocks * 2, *layout.block_shape)).to(getattr(torch, dtype))
    dst_pool = torch.zeros_like(src_pool)
    server = make_transfer_server(backend, src_pool, layout, "127.0.0.1", 0)
    server.start()
    try:
        src_ids = list(range(0, 2 * num_blocks, 2)) if scattered else list(range(num_blocks))
        dst_ids = list(range(num_blocks))
        server.expose("bench", src_ids)
        handle = KVHandle("bench", "bench", "bench", server.endpoint, src_ids, 0, layout, time.time() + 3600)
        client = make_transfer_client(backend, dst_pool, layout)
        client.pull(handle, dst_ids, timeout_s=60)  # warm-up
        seconds = []
        for _ in range(iters):
            started = time.perf_counter()
            client.pull(handle, dst_ids, timeout_s=60)
            seconds.append(time.perf_counter() - started)
        assert torch.equal(dst_pool[dst_ids].view(torch.uint8), src_pool[src_ids].view(torch.uint8))
    finally:
        server.stop()
    nbytes = num_blocks * layout.block_nbytes
    best, median = min(seconds), statistics.median(seconds)
    return {"bytes": nbytes, "best_s": best, "median_s": median, "best_gbps": nbytes / best / 1e9}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="tcp", choices=BACKENDS)
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--block-kib", type=int, default=256)
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--scattered", action="store_true", help="every other source block (no coalescing)")
    args = parser.parse_args(argv)
    result = run(args.backend, args.blocks, args.block_kib, args.dtype, args.iters, args.scattered)
    print(
        f"{args.backend}: {result['bytes'] / 2**20:.1f} MiB in {result['median_s'] * 1e3:.1f} ms median, "
        f"{result['best_s'] * 1e3:.1f} ms best ({result['best_gbps']:.2f} GB/s best)"
    )


if __name__ == "__main__":
    main()
