"""The native CPU kernels against the PyTorch expressions they replace, and their refusals."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from pdmesh.kernels import build, cpu
from pdmesh.models.layers import RotaryEmbedding, _rotate_half
from tests.unit.conftest import NEEDS_AVX2

# these tests are about the kernels, whatever PDMESH_CPU_KERNELS says
pytestmark = [NEEDS_AVX2, pytest.mark.usefixtures("cpu_kernels_built")]

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,n", [(1, 64), (32, 512), (300, 520), (7, 13)])
def test_rms_norm_matches_torch(rows: int, n: int) -> None:
    x, w = torch.randn(rows, n) * 3, torch.randn(n)
    torch.testing.assert_close(cpu.rms_norm(x, w, 1e-6, threads=2), F.rms_norm(x, (n,), w, 1e-6), **TOL)
    strided = torch.randn(rows, 2 * n)[:, :n]
    torch.testing.assert_close(
        cpu.rms_norm(strided, None, 1e-6), F.rms_norm(strided, (n,), None, 1e-6), **TOL
    )


@pytest.mark.parametrize("rows,inter", [(1, 1536), (64, 1536), (5, 12)])
def test_silu_mul_matches_torch(rows: int, inter: int) -> None:
    gu = torch.randn(rows, 2 * inter) * 6
    gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -87.5])  # exp's clamps
    expected = F.silu(gu[:, :inter]) * gu[:, inter:]
    torch.testing.assert_close(cpu.silu_mul(gu, threads=2), expected, **TOL)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("tokens", [1, 32, 130])
def test_qk_norm_rope_matches_torch(norm: bool, tokens: int) -> None:
    heads, kv_heads, d = 8, 4, 64
    rope = RotaryEmbedding(d, 1e6, 512, torch.device("cpu"), torch.float32)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d)
    positions = torch.randint(0, 512, (tokens,))
    qw, kw = (torch.randn(d), torch.randn(d)) if norm else (None, None)
    q, k, _ = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k = q.reshape(tokens, heads, d), k.reshape(tokens, kv_heads, d)
    if norm:
        q, k = F.rms_norm(q, (d,), qw, 1e-6), F.rms_norm(k, (d,), kw, 1e-6)
    cos, sin = rope.cos[positions].unsqueeze(1), rope.sin[positions].unsqueeze(1)
    q_ref, k_ref = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q_norm, k_norm = ((qw, 1e-6), (kw, 1e-6)) if norm else (None, None)
    q_out, k_out = cpu.qk_norm_rope(qkv, heads, kv_heads, d, positions, rope.cos, rope.sin, q_norm, k_norm, 2)
    torch.testing.assert_close(q_out, q_ref, **TOL)
    torch.testing.assert_close(k_out, k_ref, **TOL)


def _reference_attention(keys, values, q, lens, scale):
    outs = []
    for b, n in enumerate(lens):
        k = keys[:, b, :n].unsqueeze(0)  # [1, KVH, n, D]
        v = values[:, b, :n].unsqueeze(0)
        outs.append(
            F.scaled_dot_product_attention(q[b : b + 1].unsqueeze(2), k, v, scale=scale, enable_gqa=True)
        )
    return torch.cat(outs).squeeze(2)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_decode_attention_appends_and_matches_sdpa(group: int) -> None:
    kv_heads, batch, width, d = 2, 5, 48, 64
    lens = [1, 7, 48, 20, 33]
    buf = torch.randn(2, kv_heads, batch, width, d)
    k_new = torch.randn(batch, kv_heads, d)
    v_rows = torch.randn(batch, 3 * kv_heads * d)  # v as a strided view, as it comes out of qkv
    v_new = v_rows[:, kv_heads * d : 2 * kv_heads * d].view(batch, kv_heads, d)
    q = torch.randn(batch, kv_heads * group, d)
    expected_buf = buf.clone()
    for b, n in enumerate(lens):
        expected_buf[0, :, b, n - 1] = k_new[b]
        expected_buf[1, :, b, n - 1] = v_new[b]
    expected = _reference_attention(expected_buf[0], expected_buf[1], q, lens, 0.125)
    out = cpu.decode_attention(buf, k_new, v_new, torch.tensor(lens), q, 0.125, threads=2)
    torch.testing.assert_close(buf, expected_buf, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, **TOL)


def test_decode_attention_ignores_slots_past_each_length() -> None:
    buf = torch.randn(2, 1, 2, 16, 8)
    buf[:, :, :, 5:] = float("nan")  # whatever lies past a length must not reach the output
    k, v, q = torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.randn(2, 2, 8)
    out = cpu.decode_attention(buf, k, v, torch.tensor([5, 3]), q, 0.3)
    assert torch.isfinite(out).all()


def test_refuses_layouts_it_does_not_take() -> None:
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu.silu_mul(torch.randn(4, 8).t())
    with pytest.raises(ValueError, match="float32"):
        cpu.rms_norm(torch.randn(4, 8, dtype=torch.float64), None, 1e-6)
    with pytest.raises(ValueError, match="head_dim"):
        cpu.qk_norm_rope(torch.randn(2, 3 * 1024), 1, 1, 1024, torch.zeros(2, dtype=torch.long),
                         torch.randn(4, 1024), torch.randn(4, 1024), None, None)  # fmt: skip
    with pytest.raises(ValueError, match="outside the rotary table"):
        cpu.qk_norm_rope(torch.randn(2, 3 * 64), 1, 1, 64, torch.tensor([0, 9]),
                         torch.randn(4, 64), torch.randn(4, 64), None, None)  # fmt: skip
    buf, q = torch.randn(2, 1, 2, 16, 8), torch.randn(2, 2, 8)
    with pytest.raises(ValueError, match="lens"):
        cpu.decode_attention(
            buf, torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.tensor([1, 2], dtype=torch.int32), q, 1.0
        )
    with pytest.raises(ValueError, match="k must be"):
        cpu.decode_attention(buf, torch.randn(3, 1, 8), torch.randn(2, 1, 8), torch.tensor([1, 2]), q, 1.0)


def test_switch_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    build.load.cache_clear()
    monkeypatch.setenv(build.SWITCH, "0")
    try:
        assert build.load() is None
        assert not cpu.enabled(torch.zeros(1))
    finally:
        build.load.cache_clear()
    monkeypatch.delenv(build.SWITCH)
    assert cpu.enabled(torch.zeros(1))


def test_rebuilds_in_an_empty_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDMESH_KERNEL_CACHE", str(tmp_path))
    path = build.build(build.compiler())
    assert path.parent == tmp_path and path.exists()
    assert build.build(build.compiler()) == path  # cached: the same file, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("rows", [1, 3, 32, 70, 130])
@pytest.mark.parametrize("out_features,bias", [(1024, False), (50, True), (24, False), (7, True)])
def test_linear_matches_f_linear(rows: int, out_features: int, bias: bool) -> None:
    weight = torch.randn(out_features, 96)
    b = torch.randn(out_features) if bias else None
    packed = cpu.pack_linear(weight, b)
    x = torch.randn(rows, 96)
    torch.testing.assert_close(cpu.linear(x, packed, threads=2), F.linear(x, weight, b), rtol=1e-4, atol=1e-4)
    strided = torch.randn(rows, 200)[:, 10:106]  # rows with a stride, as a slice of a wider tensor
    torch.testing.assert_close(
        cpu.linear(strided, packed), F.linear(strided, weight, b), rtol=1e-4, atol=1e-4
    )
    assert cpu.linear(torch.randn(2, 5, 96), packed).shape == (2, 5, out_features)
    assert cpu.linear(torch.randn(0, 96), packed).shape == (0, out_features)


def test_linear_refuses_a_mismatched_input() -> None:
    packed = cpu.pack_linear(torch.randn(8, 16))
    with pytest.raises(ValueError, match="float32"):
        cpu.linear(torch.randn(2, 17), packed)
    with pytest.raises(ValueError, match="bias"):
        cpu.pack_linear(torch.randn(8, 16), torch.randn(7))


def test_prefill_attention_reads_the_pool_through_block_tables() -> None:
    # two sequences: one fresh prompt of 21 tokens, one with 19 cached tokens and 6 new ones
    num_blocks, block_size, kv_heads, heads, d = 12, 8, 2, 4, 16
    pool = torch.randn(num_blocks, 3, 2, block_size, kv_heads, d)  # [blocks, layers, K/V, ...]
    layer = pool[:, 1]
    tables = torch.tensor([[5, 2, 9, 0], [7, 1, 11, 3]])
    query_lens, context_lens = torch.tensor([21, 6]), torch.tensor([21, 25])
    q = torch.randn(27, heads, d)
    out = cpu.prefill_attention(q, layer, tables, query_lens, context_lens, 0.25, threads=2)
    start = 0
    for b in range(2):
        n, ctx = int(query_lens[b]), int(context_lens[b])
        blocks = layer[tables[b]]  # [4, 2, block_size, KVH, D]
        keys = blocks[:, 0].reshape(-1, kv_heads, d)[:ctx].transpose(0, 1).unsqueeze(0)
        values = blocks[:, 1].reshape(-1, kv_heads, d)[:ctx].transpose(0, 1).unsqueeze(0)
        mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
        qb = q[start : start + n].transpose(0, 1).unsqueeze(0)
        ref = F.scaled_dot_product_attention(qb, keys, values, attn_mask=mask, scale=0.25, enable_gqa=True)
        torch.testing.assert_close(out[start : start + n], ref.squeeze(0).transpose(0, 1), **TOL)
        start += n


def test_prefill_attention_refuses_a_table_outside_the_pool() -> None:
    layer = torch.randn(4, 2, 8, 1, 8)
    with pytest.raises(ValueError, match="outside the pool"):
        cpu.prefill_attention(
            torch.randn(3, 1, 8), layer, torch.tensor([[9]]), torch.tensor([3]), torch.tensor([3]), 1.0
        )
    with pytest.raises(ValueError, match="add up"):
        cpu.prefill_attention(
            torch.randn(3, 1, 8), layer, torch.tensor([[1]]), torch.tensor([2]), torch.tensor([2]), 1.0
        )


def test_argmax_matches_torch_on_ties_and_nans() -> None:
    x = torch.randn(33, 1000)
    x[1, [3, 700]] = 50.0  # a tie: the first index wins
    x[2, 999] = 60.0  # in the scalar tail
    x[3, [10, 500]] = float("nan")  # NaN counts as the largest, the first one
    x[4] = float("-inf")
    assert cpu.argmax(x, threads=2) == x.argmax(dim=-1).tolist()
    strided = torch.randn(5, 40)[:, :13]
    assert cpu.argmax(strided) == strided.argmax(dim=-1).tolist()


def test_store_kv_writes_k_then_v_rows_at_the_offset() -> None:
    pool_rows = torch.zeros(40, 16)
    k = torch.randn(3, 2, 8)
    v = torch.randn(3, 48)[:, 16:32].view(3, 2, 8)  # a strided view, as v comes out of qkv
    rows = torch.tensor([0, 5, 9, 1, 6, 10])
    cpu.store_kv(pool_rows, rows, 20, k, v)
    expected = torch.zeros(40, 16)
    expected.index_copy_(0, rows + 20, torch.cat((k, v)).view(6, 16))
    assert torch.equal(pool_rows, expected)
    with pytest.raises(ValueError, match="outside the pool"):
        cpu.store_kv(pool_rows, rows, 35, k, v)


def test_builds_in_the_temporary_directory_when_the_cache_cannot_be_made(tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PDMESH_KERNEL_CACHE", str(blocker / "kernels"))
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = build.build(build.compiler())
    assert path.exists() and path.parent == tmp_path / "tmp" / f"pdmesh-kernels-{os.getuid()}"
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_store_kv_refuses_heads_that_are_not_contiguous() -> None:
    pool_rows, rows = torch.zeros(8, 16), torch.tensor([0, 1, 2, 3])
    k = torch.randn(2, 8, 2).transpose(1, 2)  # [2, 2, 8] with strided heads
    with pytest.raises(ValueError, match="contiguous heads"):
        cpu.store_kv(pool_rows, rows, 0, k, torch.randn(2, 2, 8))


def test_attention_kernels_refuse_buffers_without_separate_k_and_v() -> None:
    q, k, v = torch.randn(2, 2, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match=r"buf must be \[2,"):
        cpu.decode_attention(torch.randn(1, 1, 2, 16, 8), k, v, torch.tensor([1, 2]), q, 1.0)
    with pytest.raises(ValueError, match=r"kv_cache must be \[N, 2,"):
        cpu.prefill_attention(torch.randn(3, 1, 8), torch.randn(4, 1, 8, 1, 8), torch.tensor([[1]]),
                              torch.tensor([3]), torch.tensor([3]), 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="heads or head_dim"):
        cpu.decode_attention(torch.randn(2, 0, 2, 16, 8), k[:, :0], v[:, :0], torch.tensor([1, 2]), q, 1.0)


def test_decode_attention_refuses_a_length_outside_the_buffer() -> None:
    buf, q = torch.randn(2, 1, 2, 16, 8), torch.randn(2, 2, 8)
    k, v = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    for lens in ([17, 3], [0, 3]):
        with pytest.raises(ValueError, match="outside 1..16"):
            cpu.decode_attention(buf, k, v, torch.tensor(lens), q, 1.0)


@pytest.mark.parametrize(
    "query_lens,context_lens",
    [([300, -297], [300, 3]), ([3, 0], [2, 0]), ([3, 0], [3, 1 << 40]), ([3, 0], [3, 1 << 61])],
)
def test_prefill_attention_refuses_lengths_outside_q_or_the_table(query_lens, context_lens) -> None:
    layer = torch.randn(4, 2, 8, 1, 8)
    tables = torch.tensor([[1, 2], [3, 0]])
    with pytest.raises(ValueError, match="outside the pool or q"):
        cpu.prefill_attention(torch.randn(3, 1, 8), layer, tables, torch.tensor(query_lens),
                              torch.tensor(context_lens), 1.0)  # fmt: skip


def test_qk_norm_rope_refuses_tables_and_weights_of_the_wrong_shape() -> None:
    qkv, positions = torch.randn(2, 3 * 64), torch.tensor([0, 1])
    table = torch.randn(8, 64)
    with pytest.raises(ValueError, match="cos/sin"):
        cpu.qk_norm_rope(qkv, 1, 1, 64, positions, torch.randn(64), torch.randn(64), None, None)
    with pytest.raises(ValueError, match="q norm weight"):
        cpu.qk_norm_rope(qkv, 1, 1, 64, positions, table, table, (torch.randn(1), 1e-6), None)
    with pytest.raises(ValueError, match="k norm weight"):
        cpu.qk_norm_rope(qkv, 1, 1, 64, positions, table, table, None, (torch.randn(65), 1e-6))


def test_qk_norm_rope_uses_each_norm_s_own_eps() -> None:
    qkv, positions = torch.randn(1, 3 * 8) * 1e-3, torch.tensor([0])  # tiny values: eps matters
    table, w = torch.ones(1, 8), torch.ones(8)
    q, k = cpu.qk_norm_rope(qkv, 1, 1, 8, positions, table, torch.zeros(1, 8), (w, 1e-6), (w, 1.0))
    torch.testing.assert_close(q[0, 0], F.rms_norm(qkv[0, :8], (8,), w, 1e-6), **TOL)
    torch.testing.assert_close(k[0, 0], F.rms_norm(qkv[0, 8:16], (8,), w, 1.0), **TOL)


def test_kernels_refuse_tensors_off_the_cpu_and_empty_widths() -> None:
    meta = torch.empty(2, 8, device="meta")
    with pytest.raises(ValueError, match="CPU"):
        cpu.rms_norm(meta, None, 1e-6)
    with pytest.raises(ValueError, match="CPU"):
        cpu.linear(meta, cpu.pack_linear(torch.randn(4, 8)))
    with pytest.raises(ValueError, match="CPU"):
        cpu.argmax(meta)
    with pytest.raises(ValueError, match="non-zero"):
        cpu.silu_mul(torch.randn(3, 0))


def test_nan_stays_nan_through_exp() -> None:
    # a NaN upstream (an overflow) must show in the output, as with PyTorch, not vanish as weight 0
    gu = torch.randn(1, 16)
    gu[0, 2] = float("nan")
    assert torch.isnan(cpu.silu_mul(gu)[0, 2])
    buf, q = torch.randn(2, 1, 1, 8, 8), torch.randn(1, 1, 8)
    buf[0, 0, 0, 1, 0] = float("nan")  # one key element: its score is NaN
    out = cpu.decode_attention(buf, torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.tensor([3]), q, 1.0)
    assert torch.isnan(out).all()


def test_refuses_a_temporary_directory_others_can_write(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PDMESH_KERNEL_CACHE", str(blocker / "kernels"))
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    shared = tmp_path / f"pdmesh-kernels-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant a library here
    with pytest.raises(OSError, match="not a private directory"):
        build.build(build.compiler())
