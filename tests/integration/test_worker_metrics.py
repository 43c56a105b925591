"""The worker's KV-transfer and handle series over real transfer servers, clients and pools.

Every CPU backend: a pull through the worker's ``KVPlane`` counts its bytes on the receiving side,
the serving transfer server counts the same bytes as sent, and a refused pull counts a failure by
cause. Series follow a role flip. Values are read back from prometheus_client's registry as a
scrape would see them.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import torch
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.engine.types import EngineStats
from pdmesh.kv.transfer.base import BACKENDS, allocate_pool, make_transfer_server
from pdmesh.kv.transfer.errors import TransferError
from pdmesh.kv.transfer.sharded import ShardedPuller
from pdmesh.kv.types import KVHandle, KVLayout
from services.worker.kv_plane import KVPlane
from services.worker.metrics import LOAD, WorkerMetrics

pytestmark = pytest.mark.timeout(90)

LAYOUT = KVLayout("tiny", "mha", 2, 2, 8, 16, "float32", (2, 2, 16, 2, 8))
NUM_BLOCKS = 32
CPU_BACKENDS = [b for b in BACKENDS if b != "cuda_ipc"]


def value(name: str, **labels: str) -> float:
    families = text_string_to_metric_families(generate_latest(REGISTRY).decode())
    return sum(
        s.value
        for f in families
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _instance(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # a fresh id: series of other tests never mix in


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_pull_counts_the_same_bytes_on_both_sides(backend: str) -> None:
    prefill_id, decode_id = _instance("p"), _instance("d")
    sender = WorkerMetrics(prefill_id, lambda: "prefill", backend)
    receiver = WorkerMetrics(decode_id, lambda: "decode", backend)
    src = allocate_pool(backend, NUM_BLOCKS, LAYOUT, name=_instance("metrics"))
    src.copy_(torch.randn(src.shape))
    server = make_transfer_server(backend, src, LAYOUT, "127.0.0.1", 0)
    server.on_served = sender.kv_sent
    server.start()
    dst = torch.zeros_like(src)
    plane = KVPlane(LAYOUT, ShardedPuller(backend, dst, LAYOUT), lambda ids: (0, ids))
    plane.metrics = receiver
    try:
        server.expose("h1", [3, 4, 9])
        handle = KVHandle("h1", "r1", prefill_id, server.endpoint, [3, 4, 9], 40, LAYOUT, time.time() + 60)
        asyncio.run(plane.pull(handle, [0, 1, 2], timeout_s=30))
        assert torch.equal(dst[:3], src[[3, 4, 9]])
        expected = 3 * LAYOUT.block_nbytes
        got = value("pdmesh_worker_kv_transfer_bytes_total", pdmesh_instance=decode_id, direction="receive")
        assert got == expected
        sent = {"pdmesh_instance": prefill_id, "backend": backend, "direction": "send", "role": "prefill"}
        deadline = time.monotonic() + 10  # the server counts once its side of the pull has ended
        while value("pdmesh_worker_kv_transfer_bytes_total", **sent) != expected:
            assert time.monotonic() < deadline, "the server did not count the bytes it served"
            time.sleep(0.01)
        assert value("pdmesh_worker_kv_transfer_duration_seconds_count", pdmesh_instance=decode_id) == 1

        with pytest.raises(TransferError):
            gone = KVHandle("gone", "r2", prefill_id, server.endpoint, [1], 16, LAYOUT, time.time() + 60)
            asyncio.run(plane.pull(gone, [5], timeout_s=30))
        failed = {"pdmesh_instance": decode_id, "backend": backend, "cause": "refused"}
        assert value("pdmesh_worker_kv_transfer_failures_total", **failed) == 1
    finally:
        plane.close()
        server.stop()


def test_series_follow_a_role_flip() -> None:
    role = {"now": "prefill"}
    instance = _instance("flip")
    metrics = WorkerMetrics(instance, lambda: role["now"], "tcp")
    stats = EngineStats(2, 1, 30, 64, 0, prefix_cache_query_tokens=48, prefix_cache_hit_tokens=16)
    LOAD.add(metrics, lambda: stats)
    try:
        metrics.handle("registered")
        metrics.engine_step([(True, 2)], 0.01, stats)
        assert value("pdmesh_worker_requests_running", pdmesh_instance=instance, role="prefill") == 2
        assert value("pdmesh_worker_kv_blocks_used", pdmesh_instance=instance) == 34
        role["now"] = "decode"
        metrics.handle("claimed")
        later = EngineStats(0, 0, 64, 64, 0, prefix_cache_query_tokens=48, prefix_cache_hit_tokens=16)
        metrics.engine_step([(False, 3)], 0.002, later)
        handles = "pdmesh_worker_kv_handles_total"
        assert value(handles, pdmesh_instance=instance, role="prefill", event="registered") == 1
        assert value(handles, pdmesh_instance=instance, role="decode", event="claimed") == 1
        hits = "pdmesh_worker_prefix_cache_hits_tokens_total"
        assert value(hits, pdmesh_instance=instance, role="prefill") == 16  # nothing new after the flip
        assert value(hits, pdmesh_instance=instance, role="decode") == 0
        steps = "pdmesh_worker_batch_size_sum"
        assert value(steps, pdmesh_instance=instance, role="decode", phase="decode") == 3
        assert value("pdmesh_worker_requests_running", pdmesh_instance=instance, role="prefill") == 0
        assert value("pdmesh_worker_kv_blocks_free", pdmesh_instance=instance, role="decode") == 30
    finally:
        LOAD.remove(metrics)
    assert value("pdmesh_worker_kv_blocks_free", pdmesh_instance=instance) == 0  # a stopped worker's are gone
