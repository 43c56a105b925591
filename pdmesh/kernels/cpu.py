"""The CPU kernels as tensor functions, each a drop-in for a PyTorch expression of the models.

``enabled(t)`` says whether the kernels apply to tensor ``t`` (float32 on a CPU where the library
built, see ``build``); callers keep their PyTorch expression otherwise. Each function checks the
layout it hands to C (shapes, strides, dtypes, devices) and raises ``ValueError`` naming what is off,
so a pointer never reaches the library with a layout it does not expect; indices that come with the
data (positions, block ids, slot rows, lengths) are checked in C, where they are read, and reported
as a ``ValueError`` too. ``threads`` is how many
OpenMP threads a kernel may use; the row-wise kernels only split work above a few tens of
thousands of values (a decode step's rows stay on one thread, as ``models.threads`` wants).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdmesh.kernels.build import load

MAX_HEAD_DIM = 512  # the per-head scratch of qk_norm_rope
LINEAR_PANEL = 24  # output columns per packed panel (LINEAR_NR in cpu_ops.c)


def enabled(t: torch.Tensor) -> bool:
    """True when the kernels can run on ``t`` (float32, CPU, library loaded)."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and load() is not None


def _lib():
    lib = load()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available here")
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _f32_contiguous(name: str, t: torch.Tensor | None) -> None:
    if t is not None:
        _require(
            t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous(),
            f"{name} must be contiguous float32 on the CPU",
        )


def _on_cpu(name: str, *tensors: torch.Tensor) -> None:
    _require(all(t.device.type == "cpu" for t in tensors), f"{name}: tensors must be on the CPU")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, threads: int = 1) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x**2, -1) + eps))`` over the last dim of ``x`` (float32, rows may
    be strided, the last dim contiguous); returns a new contiguous tensor."""
    n = x.shape[-1]
    _on_cpu("rms_norm", x)
    rows = x.reshape(-1, n) if x.dim() != 2 else x
    _require(
        rows.dtype == torch.float32 and rows.stride(-1) == 1,
        "rms_norm: x must be float32, last dim contiguous",
    )
    _f32_contiguous("rms_norm weight", weight)
    _require(weight is None or weight.numel() == n, "rms_norm: weight size differs from the last dim")
    out = torch.empty(x.shape, dtype=torch.float32)
    _lib().pdm_rms_norm(_ptr(rows), rows.stride(0), _ptr(weight), eps, rows.shape[0], n, _ptr(out), threads)
    return out


def silu_mul(gate_up: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """``silu(gate_up[..., :I]) * gate_up[..., I:]`` for ``gate_up`` ``[..., 2I]`` (contiguous)."""
    _f32_contiguous("silu_mul input", gate_up)
    inter = gate_up.shape[-1] // 2
    _require(inter > 0 and gate_up.shape[-1] == 2 * inter, "silu_mul: the last dim must be even and non-zero")
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=torch.float32)
    _lib().pdm_silu_mul(_ptr(gate_up), gate_up.numel() // (2 * inter), inter, _ptr(out), threads)
    return out


def qk_norm_rope(
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: tuple[torch.Tensor, float] | None,
    k_norm: tuple[torch.Tensor, float] | None,
    threads: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """From a fused projection ``qkv`` ``[T, (H + 2 KVH) * D]``: q ``[T, H, D]`` and k ``[T, KVH, D]``,
    each head RMS-normed (``q_norm``/``k_norm``: weight ``[D]`` and eps, or None for no norm) and then
    rotated (rotate-half rope) by the ``[max_positions, D]`` ``cos``/``sin`` rows of its token's
    position ``positions`` ``[T]``."""
    t = qkv.shape[0]
    _on_cpu("qk_norm_rope", qkv, positions)
    _require(
        qkv.dim() == 2 and qkv.dtype == torch.float32 and qkv.stride(1) == 1,
        "qk_norm_rope: qkv must be 2-D float32 with contiguous rows",
    )
    _require(qkv.shape[1] >= (heads + kv_heads) * head_dim, "qk_norm_rope: qkv is narrower than q and k")
    _require(supports_rope(head_dim), f"qk_norm_rope: head_dim {head_dim} unsupported")
    _require(
        cos.dim() == 2 and cos.shape == sin.shape and cos.shape[1] == head_dim,
        "qk_norm_rope: cos/sin must be [P, head_dim]",
    )
    q_weight, q_eps = q_norm if q_norm is not None else (None, 0.0)
    k_weight, k_eps = k_norm if k_norm is not None else (None, 0.0)
    for name, tensor in (("cos", cos), ("sin", sin), ("q_weight", q_weight), ("k_weight", k_weight)):
        _f32_contiguous(f"qk_norm_rope {name}", tensor)
    for name, weight in (("q", q_weight), ("k", k_weight)):
        _require(
            weight is None or weight.numel() == head_dim,
            f"qk_norm_rope: the {name} norm weight is not [head_dim]",
        )
    _require(
        positions.dtype == torch.int64 and positions.is_contiguous() and positions.numel() == t,
        "qk_norm_rope: positions must be contiguous int64, one per token",
    )
    q = torch.empty(t, heads, head_dim, dtype=torch.float32)
    k = torch.empty(t, kv_heads, head_dim, dtype=torch.float32)
    bad = _lib().pdm_qk_norm_rope(
        _ptr(qkv), qkv.stride(0), t, heads, kv_heads, head_dim, _ptr(positions), _ptr(cos), _ptr(sin),
        cos.shape[0], _ptr(q_weight), q_eps, _ptr(k_weight), k_eps, _ptr(q), _ptr(k), threads,
    )  # fmt: skip
    if bad:
        raise ValueError(f"qk_norm_rope: a position is outside the rotary table's {cos.shape[0]} positions")
    return q, k


def supports_rope(head_dim: int) -> bool:
    """Whether ``qk_norm_rope`` takes this head size (even, within its per-head scratch)."""
    return head_dim % 2 == 0 and head_dim <= MAX_HEAD_DIM


def supports_attention(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the attention kernels take this head layout (whole query groups, D a multiple of 8)."""
    return kv_heads > 0 and heads % kv_heads == 0 and head_dim % 8 == 0


def _rows_of_heads(what: str, name: str, t: torch.Tensor, rows: int, kv_heads: int, head_dim: int) -> None:
    """``t`` is float32 ``[rows, KVH, D]`` on the CPU, each head's D values contiguous and the heads
    of a row adjacent (rows may be any distance apart, as in a slice of a fused qkv)."""
    _require(
        t.shape == (rows, kv_heads, head_dim)
        and t.dtype == torch.float32
        and t.device.type == "cpu"
        and t.stride(2) == 1
        and t.stride(1) == head_dim,
        f"{what}: {name} must be float32 [T, KVH, D] with contiguous heads",
    )


def store_kv(
    pool_rows: torch.Tensor, rows: torch.Tensor, offset: int, k: torch.Tensor, v: torch.Tensor
) -> None:
    """``pool_rows[rows + offset] = cat(k, v)`` for ``k``/``v`` ``[T, KVH, D]`` (heads contiguous, any
    token stride) into the pool seen as rows of ``KVH * D`` values; ``rows`` ``[2T]`` int64, the
    K rows then the V rows."""
    _require(k.dim() == 3, "store_kv: k must be float32 [T, KVH, D] with contiguous heads")
    tokens, kv_heads, head_dim = k.shape
    width = pool_rows.shape[1]
    _f32_contiguous("store_kv pool_rows", pool_rows)
    _on_cpu("store_kv", rows)
    _require(kv_heads * head_dim == width, "store_kv: a token's K/V is not one pool row")
    _rows_of_heads("store_kv", "k", k, tokens, kv_heads, head_dim)
    _rows_of_heads("store_kv", "v", v, tokens, kv_heads, head_dim)
    _require(
        rows.dtype == torch.int64 and rows.is_contiguous() and rows.numel() == 2 * tokens, "store_kv: rows"
    )
    bad = _lib().pdm_store_kv(
        _ptr(pool_rows), pool_rows.shape[0], width, _ptr(rows), offset, _ptr(k), k.stride(0), _ptr(v), v.stride(0),
        tokens,
    )  # fmt: skip
    if bad:
        raise ValueError("store_kv: a slot lies outside the pool")


def decode_attention(
    buf: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lens: torch.Tensor,
    q: torch.Tensor,
    scale: float,
    threads: int = 1,
) -> torch.Tensor:
    """Appends this step's ``k``/``v`` ``[B, KVH, D]`` at position ``lens[b] - 1`` of the workspace
    buffer ``buf`` ``[2, KVH, B, width, D]`` and returns attention of ``q`` ``[B, H, D]`` over each
    sequence's first ``lens[b]`` positions, ``[B, H, D]``. A length outside ``1..width`` raises
    ``ValueError`` (checked in C, where the lengths are read anyway)."""
    _require(buf.dim() == 5 and buf.shape[0] == 2, "decode_attention: buf must be [2, KVH, B, width, D]")
    _, kv_heads, batch, width, head_dim = buf.shape
    _f32_contiguous("decode_attention buf", buf)
    _f32_contiguous("decode_attention q", q)
    _require(q.dim() == 3, "decode_attention: q must be [B, H, D]")
    heads = q.shape[1]
    _require(q.shape == (batch, heads, head_dim), "decode_attention: q must be [B, H, D]")
    _require(supports_attention(heads, kv_heads, head_dim), "decode_attention: heads or head_dim unsupported")
    _rows_of_heads("decode_attention", "k", k, batch, kv_heads, head_dim)
    _rows_of_heads("decode_attention", "v", v, batch, kv_heads, head_dim)
    _require(
        lens.dtype == torch.int64
        and lens.device.type == "cpu"
        and lens.is_contiguous()
        and lens.numel() == batch,
        "decode_attention: lens must be contiguous int64, one per sequence",
    )
    out = torch.empty(batch, heads, head_dim, dtype=torch.float32)
    failed = _lib().pdm_decode_attention(
        _ptr(buf), kv_heads, batch, width, head_dim, _ptr(k), k.stride(0), _ptr(v), v.stride(0),
        _ptr(lens), _ptr(q), heads, scale, _ptr(out), threads,
    )  # fmt: skip
    if failed:
        raise ValueError(f"decode_attention: a length is outside 1..{width} (or scratch memory ran out)")
    return out


@dataclass(frozen=True)
class PackedLinear:
    """A linear layer's weight packed for ``linear``: ``[panels, in_features, LINEAR_PANEL]``, output
    columns zero-padded to whole panels, and its bias padded alike (or None)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    in_features: int
    out_features: int

    @property
    def weight_ptr(self) -> int:
        return self.weight.data_ptr()

    @property
    def bias_ptr(self) -> int | None:
        return None if self.bias is None else self.bias.data_ptr()


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear:
    """Packs a float32 ``[out, in]`` weight (and ``[out]`` bias) once, for ``linear``."""
    _require(weight.dim() == 2 and weight.dtype == torch.float32, "pack_linear: weight must be 2-D float32")
    out_features, in_features = weight.shape
    panels = -(-out_features // LINEAR_PANEL)
    padded = torch.zeros(panels * LINEAR_PANEL, in_features, dtype=torch.float32)
    padded[:out_features] = weight
    packed = padded.view(panels, LINEAR_PANEL, in_features).transpose(1, 2).contiguous()
    _require(packed.data_ptr() % 32 == 0, "pack_linear: the packed weight is not 32-byte aligned")
    padded_bias = None
    if bias is not None:
        _require(bias.shape == (out_features,), "pack_linear: bias must be [out_features]")
        padded_bias = torch.zeros(panels * LINEAR_PANEL, dtype=torch.float32)
        padded_bias[:out_features] = bias
    return PackedLinear(packed, padded_bias, in_features, out_features)


def linear(x: torch.Tensor, packed: PackedLinear, threads: int = 1) -> torch.Tensor:
    """``x @ W.T + b`` for ``x`` ``[..., in_features]`` (float32, last dim contiguous)."""
    _require(
        x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[-1] == packed.in_features,
        "linear: x must be float32 [..., in] on the CPU",
    )
    flat = x.dim() == 2  # the usual case: no reshape and no view (a few microseconds per call)
    rows = x if flat else x.reshape(-1, packed.in_features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    out = torch.empty(m, packed.out_features, dtype=torch.float32)
    if m:
        _lib().pdm_linear(
            rows.data_ptr(), m, packed.in_features, rows.stride(0), packed.weight_ptr, packed.out_features,
            packed.bias_ptr, out.data_ptr(), threads,
        )  # fmt: skip
    return out if flat else out.view(*x.shape[:-1], packed.out_features)


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    threads: int = 1,
) -> torch.Tensor:
    """Causal attention of a prefill batch's new tokens ``q`` ``[T, H, D]`` (sequence after
    sequence) over each sequence's whole context, read from one layer's pool view ``kv_cache``
    ``[blocks, 2, block_size, KVH, D]`` (already holding the new tokens) through ``block_tables``
    ``[B, width]``; ``query_lens``/``context_lens`` ``[B]`` int64. Returns ``[T, H, D]``. Lengths
    and block ids are checked in C (where they are read anyway): a block id outside the pool, a
    context shorter than its queries or longer than its table, or queries outside q's rows raise
    ``ValueError``."""
    _require(
        kv_cache.dim() == 5 and kv_cache.shape[1] == 2,
        "prefill_attention: kv_cache must be [N, 2, bs, KVH, D]",
    )
    num_blocks, _, block_size, kv_heads, head_dim = kv_cache.shape
    _f32_contiguous("prefill_attention q", q)
    _require(q.dim() == 3 and q.shape[2] == head_dim, "prefill_attention: q must be [T, H, D]")
    heads = q.shape[1]
    _require(
        supports_attention(heads, kv_heads, head_dim), "prefill_attention: heads or head_dim unsupported"
    )
    _require(
        kv_cache.dtype == torch.float32
        and kv_cache.device.type == "cpu"
        and kv_cache.stride(4) == 1
        and kv_cache.stride(3) == head_dim,
        "prefill_attention: kv_cache must be float32 on the CPU with contiguous heads",
    )
    for name, t in (
        ("block_tables", block_tables),
        ("query_lens", query_lens),
        ("context_lens", context_lens),
    ):
        _require(
            t.dtype == torch.int64 and t.device.type == "cpu" and t.is_contiguous(),
            f"prefill_attention: {name} must be contiguous int64",
        )
    batch = query_lens.numel()
    _require(
        block_tables.dim() == 2 and block_tables.shape[0] == batch,
        "prefill_attention: one table per sequence",
    )
    _require(context_lens.numel() == batch, "prefill_attention: one context length per sequence")
    query_start = query_lens.cumsum(0) - query_lens
    _require(
        int(query_lens.sum()) == q.shape[0], "prefill_attention: query lengths do not add up to q's rows"
    )
    out = torch.empty_like(q)
    bad = _lib().pdm_prefill_attention(
        _ptr(q), q.shape[0], heads, kv_heads, head_dim, _ptr(kv_cache), kv_cache.stride(0), kv_cache.stride(1),
        kv_cache.stride(2), block_size, _ptr(block_tables), block_tables.shape[1], num_blocks, _ptr(query_start),
        _ptr(query_lens), _ptr(context_lens), batch, scale, _ptr(out), threads,
    )  # fmt: skip
    if bad:
        raise ValueError(
            "prefill_attention: a block id, context length or query length points outside the pool or q"
        )
    return out


def argmax(x: torch.Tensor, threads: int = 1) -> list[int]:
    """``x.argmax(dim=-1).tolist()`` for float32 ``x`` ``[rows, n]`` with contiguous rows (the first
    index on ties, a NaN above all, as torch)."""
    _require(
        x.dim() == 2
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.stride(1) == 1
        and x.shape[1] > 0,
        "argmax: x must be non-empty 2-D float32 on the CPU with contiguous rows",
    )
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _lib().pdm_argmax(_ptr(x), x.shape[0], x.shape[1], x.stride(0), _ptr(out), threads)
    return out.tolist()
