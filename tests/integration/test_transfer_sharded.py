"""KV pulls between instances of different tensor parallelism, over real transfer servers.

A "prefill instance" of tp 2 serves the two halves of each block's KV heads from two servers; a
"decode rank" of tp 1 gathers both halves into its blocks, one of tp 2 takes its half straight, and
from a single-rank prefill a tp-2 decode rank slices its half out. What cannot be mapped is refused
before any connection is made (the endpoints in those handles do not exist).
"""

from __future__ import annotations

import time
import uuid

import pytest
import torch

from pdmesh.kv.transfer.base import allocate_pool, make_transfer_server
from pdmesh.kv.transfer.errors import TransferError
from pdmesh.kv.transfer.sharded import RankHeads, ShardedPuller, plan_pull
from pdmesh.kv.types import KVHandle, KVLayout, KVPart

pytestmark = pytest.mark.timeout(60)

HEADS = 4
FULL = KVLayout("tiny", "mha", 2, HEADS, 8, 4, "float32", (2, 2, 4, HEADS, 8))
HALF = FULL.with_heads(2)
NUM_BLOCKS = 12
SRC_IDS = [3, 5, 6]
DST_IDS = [7, 1, 9]


def _server(backend: str, layout: KVLayout, content: torch.Tensor):
    pool = allocate_pool(backend, NUM_BLOCKS, layout, name=f"test-{uuid.uuid4().hex[:12]}")
    pool.copy_(content)
    server = make_transfer_server(backend, pool, layout, "127.0.0.1", 0)
    server.start()
    server.expose("h", SRC_IDS)
    return server, pool


def _handle(layout: KVLayout, endpoint: str, parts: list[KVPart]) -> KVHandle:
    return KVHandle("h", "h", "p0", endpoint, SRC_IDS, 12, layout, time.time() + 60, parts=parts)


@pytest.fixture(params=["tcp", "shm"])
def prefill(request):
    """The full KV, a tp-2 prefill instance serving its halves and a tp-1 one serving it whole."""
    backend = request.param
    full = torch.randn((NUM_BLOCKS, *FULL.block_shape), generator=torch.Generator().manual_seed(5))
    servers = [
        _server(backend, HALF, full[..., 0:2, :].contiguous()),
        _server(backend, HALF, full[..., 2:4, :].contiguous()),
        _server(backend, FULL, full),
    ]
    parts = [KVPart(r, servers[r][0].endpoint, 0, r, 2, 2 * r, 2, HEADS) for r in range(2)]
    try:
        yield (
            backend,
            full,
            _handle(HALF, parts[0].endpoint, parts),
            _handle(FULL, servers[2][0].endpoint, []),
        )
    finally:
        for server, _ in servers:
            server.stop()


def _pull(backend: str, layout: KVLayout, heads: RankHeads, handle: KVHandle, prefer: int = 0):
    pool = torch.zeros((NUM_BLOCKS, *layout.block_shape))
    puller = ShardedPuller(backend, pool, layout)
    try:
        steps = plan_pull(handle, layout, heads, prefer)
        puller.pull(handle, steps, DST_IDS, 10.0)
    finally:
        puller.close()
    return pool, steps


def test_tp2_to_tp1_gathers_both_halves(prefill) -> None:
    backend, full, tp2, _ = prefill
    pool, steps = _pull(backend, FULL, RankHeads(0, HEADS, HEADS), tp2)
    assert [(s.part.rank, s.direct) for s in steps] == [(0, False), (1, False)]
    assert torch.equal(pool[DST_IDS], full[SRC_IDS])


def test_same_tp_pulls_straight(prefill) -> None:
    backend, full, tp2, _ = prefill
    pool, steps = _pull(backend, HALF, RankHeads(2, 2, HEADS), tp2, prefer=1)
    assert [(s.part.rank, s.direct) for s in steps] == [(1, True)]
    assert torch.equal(pool[DST_IDS], full[SRC_IDS][..., 2:4, :])


def test_tp1_to_tp2_slices_this_ranks_heads(prefill) -> None:
    backend, full, _, tp1 = prefill
    pool, steps = _pull(backend, HALF, RankHeads(2, 2, HEADS), tp1, prefer=1)
    assert [(s.src_start, s.dst_start, s.count, s.direct) for s in steps] == [(2, 0, 2, False)]
    assert torch.equal(pool[DST_IDS], full[SRC_IDS][..., 2:4, :])
    untouched = [b for b in range(NUM_BLOCKS) if b not in DST_IDS]
    assert not pool[untouched].any()


def test_what_cannot_be_mapped_is_refused_before_any_connection() -> None:
    nowhere = "tcp://127.0.0.1:9"  # nothing listens: any attempt to connect would fail differently
    half_only = _handle(HALF, nowhere, [KVPart(0, nowhere, 0, 0, 2, 0, 2, HEADS)])
    with pytest.raises(TransferError, match="no prefill rank of h holds KV head 2"):
        plan_pull(half_only, FULL, RankHeads(0, HEADS, HEADS))
    other_dtype = _handle(
        KVLayout(**{**HALF.to_dict(), "dtype": "bfloat16", "block_shape": HALF.block_shape}), nowhere, []
    )
    with pytest.raises(TransferError, match="dtype"):
        plan_pull(other_dtype, HALF, RankHeads(0, 2, HEADS))
    other_model = _handle(HALF, nowhere, [KVPart(0, nowhere, 0, 0, 1, 0, 2, 2)])
    with pytest.raises(TransferError, match="caches \\[2\\] KV heads"):
        plan_pull(other_model, HALF, RankHeads(0, 2, HEADS))


def test_an_mla_latent_cache_comes_whole_from_one_rank() -> None:
    mla = KVLayout("tiny", "mla", 2, 1, 40, 4, "float32", (2, 4, 40))
    parts = [KVPart(r, f"tcp://127.0.0.1:{9 + r}", 0, r, 2, 0, 1, 1) for r in range(2)]
    for prefer in (0, 1):
        (step,) = plan_pull(_handle(mla, parts[0].endpoint, parts), mla, RankHeads.whole(mla), prefer)
        assert step.direct and step.part.rank == prefer
