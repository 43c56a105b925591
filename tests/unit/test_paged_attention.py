"""The two decode paths of ``PagedAttention`` (exact per-sequence and padded batch) agree."""

from __future__ import annotations

import torch

from pdmesh.models import attention
from pdmesh.models.attention import AttentionMetadata, PagedAttention
from pdmesh.models.threads import single_thread


def _setup(lens: list[int], block: int = 4) -> tuple[PagedAttention, torch.Tensor, AttentionMetadata]:
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = 4, 2, 8
    width = max(-(-n // block) for n in lens)
    pool = torch.randn(1 + len(lens) * width, 2, block, kv_heads, dim, generator=gen)
    attn = PagedAttention(heads, kv_heads, dim)
    attn.bind(pool.unsqueeze(1), 0)
    perm = torch.randperm(pool.shape[0] - 1, generator=gen) + 1  # scattered, non-zero block ids
    tables = perm.view(len(lens), width)
    lens_t = torch.tensor(lens)
    mask = torch.arange(width * block)[None, :] < lens_t[:, None]
    last = lens_t - 1
    blocks = tables[torch.arange(len(lens)), last // block]
    meta = AttentionMetadata(
        False, blocks, last % block, tables, [1] * len(lens), lens, mask[:, None, None, :]
    )
    return attn, torch.randn(len(lens), heads, dim, generator=gen), meta


def test_exact_and_padded_decode_agree() -> None:
    attn, q, meta = _setup([5, 12, 1, 9])
    torch.testing.assert_close(attn._decode_exact(q, meta), attn._decode_padded(q, meta))


def test_decode_picks_the_path_by_size(monkeypatch) -> None:
    attn, q, meta = _setup([3, 7])
    calls: list[str] = []
    monkeypatch.setattr(attn, "_decode_exact", lambda q, m: calls.append("exact") or q)
    monkeypatch.setattr(attn, "_decode_padded", lambda q, m: calls.append("padded") or q)
    attn._decode(q, meta)
    monkeypatch.setattr(attention, "SMALL_DECODE_ELEMENTS", 0)
    attn._decode(q, meta)
    assert calls == ["exact", "padded"]


def test_single_thread_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    with single_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    try:
        with single_thread():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == before
