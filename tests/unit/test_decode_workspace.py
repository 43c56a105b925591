"""The decode workspace: dense K/V kept across steps gives the same attention as gathering each step."""

from __future__ import annotations

import pytest
import torch

from pdmesh.models.attention import AttentionMetadata, PagedAttention
from pdmesh.models.decode_workspace import DecodeWorkspace

pytestmark = pytest.mark.timeout(60)

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 8, 4


class _Seq:
    """Stands for an engine Sequence: the workspace only compares identities."""


def _pool(blocks: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(blocks, 2, BLOCK, KV_HEADS, DIM, generator=torch.Generator().manual_seed(seed))


def _meta(tables: torch.Tensor, lens: list[int]) -> AttentionMetadata:
    lens_t = torch.tensor(lens)
    last = lens_t - 1
    blocks = tables[torch.arange(len(lens)), last // BLOCK]
    mask = torch.arange(tables.shape[1] * BLOCK)[None, :] < lens_t[:, None]
    return AttentionMetadata(
        False, blocks, last % BLOCK, tables, [1] * len(lens), lens, mask[:, None, None, :]
    )


def _step(attn, ws, seqs, tables, lens, gen):
    """One decode step of every layer-0 sequence: returns (workspace output, gather output, rebuilt)."""
    q = torch.randn(len(lens), HEADS, DIM, generator=gen)
    k = torch.randn(len(lens), KV_HEADS, DIM, generator=gen)
    v = torch.randn(len(lens), KV_HEADS, DIM, generator=gen)
    plain = _meta(tables, lens)
    expected = attn(q, k, v, plain)  # writes the new token into the pool, then gathers
    meta = _meta(tables, lens)
    assert ws.begin(seqs, lens, torch.device("cpu"), torch.float32)
    meta.workspace = ws
    got = attn(q, k, v, meta)  # same token written again, then the workspace path
    ws.commit()
    return got, expected, ws.rebuild


def test_appending_steps_match_gathering_and_rebuild_only_when_the_batch_changes() -> None:
    gen = torch.Generator().manual_seed(1)
    width = 6  # blocks per sequence: room for 24 tokens
    pool = _pool(1 + 3 * width)
    attn = PagedAttention(HEADS, KV_HEADS, DIM)
    attn.bind(pool.unsqueeze(1), 0)
    ws = DecodeWorkspace(1, KV_HEADS, DIM, BLOCK, budget_bytes=1 << 20)
    tables = (torch.randperm(3 * width, generator=gen) + 1).view(3, width)
    seqs, lens = [_Seq(), _Seq(), _Seq()], [3, 9, 5]
    rebuilds = []
    for _ in range(8):
        got, expected, rebuilt = _step(attn, ws, seqs, tables, lens, gen)
        torch.testing.assert_close(got, expected)
        rebuilds.append(rebuilt)
        lens = [n + 1 for n in lens]
    assert rebuilds == [True] + [False] * 7
    # a sequence leaves: the next step rebuilds, then appends again
    seqs, tables, lens = seqs[:2], tables[:2], lens[:2]
    for expect_rebuild in (True, False):
        got, expected, rebuilt = _step(attn, ws, seqs, tables, lens, gen)
        torch.testing.assert_close(got, expected)
        assert rebuilt is expect_rebuild
        lens = [n + 1 for n in lens]


def test_whatever_the_buffers_held_masked_slots_do_not_leak_in() -> None:
    # the batch's longest sequence outgrows the blocks gathered at the rebuild while a short one
    # appends: the short one's masked slots past the gathered span must not hold NaN
    gen = torch.Generator().manual_seed(3)
    pool = _pool(1 + 2 * 6)
    attn = PagedAttention(HEADS, KV_HEADS, DIM)
    attn.bind(pool.unsqueeze(1), 0)
    ws = DecodeWorkspace(1, KV_HEADS, DIM, BLOCK, budget_bytes=1 << 20)
    ws._buffers[0] = torch.full((1 << 14,), float("nan"))  # stale memory at its worst
    full = (torch.randperm(2 * 6, generator=gen) + 1).view(2, 6)
    seqs, lens = [_Seq(), _Seq()], [2, 7]
    for _ in range(12):
        tables = full[:, : -(-max(lens) // BLOCK)]  # blocks are allocated as the longest grows
        got, expected, _ = _step(attn, ws, seqs, tables, lens, gen)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected)
        lens = [n + 1 for n in lens]


def test_a_step_that_is_not_committed_or_a_prefill_forces_a_rebuild() -> None:
    ws = DecodeWorkspace(1, KV_HEADS, DIM, BLOCK, budget_bytes=1 << 20)
    seqs = [_Seq()]
    assert ws.begin(seqs, [4], torch.device("cpu"), torch.float32) and ws.rebuild
    # no commit: the step failed midway
    assert ws.begin(seqs, [5], torch.device("cpu"), torch.float32) and ws.rebuild
    ws.commit()
    assert ws.begin(seqs, [6], torch.device("cpu"), torch.float32) and not ws.rebuild
    ws.commit()
    ws.invalidate()  # a prefill step ran in between
    assert ws.begin(seqs, [7], torch.device("cpu"), torch.float32) and ws.rebuild
    ws.commit()
    # the same batch but a length that did not grow by exactly one (e.g. recomputed)
    assert ws.begin(seqs, [9], torch.device("cpu"), torch.float32) and ws.rebuild


def test_a_batch_over_the_budget_falls_back() -> None:
    ws = DecodeWorkspace(2, KV_HEADS, DIM, BLOCK, budget_bytes=4096)
    assert not ws.begin([_Seq()] * 4, [100] * 4, torch.device("cpu"), torch.float32)
