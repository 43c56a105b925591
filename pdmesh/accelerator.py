"""The one place that knows about devices: cpu, cuda[:N], npu[:N] (torch_npu, imported on demand),
and the process-group backend of each (gloo, nccl, hccl) for the ranks of a parallel instance."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _import_torch_npu() -> None:
    try:
        import torch_npu  # noqa: F401
    except ImportError as exc:
        raise ValueError("device 'npu' needs torch_npu installed") from exc


def resolve_device(name: str) -> torch.device:
    """``torch.device`` for ``name``; ValueError when that kind of device is not available here."""
    kind = name.split(":")[0]
    if kind == "cpu":
        return torch.device(name)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA device is available")
        return torch.device(name)
    if kind == "npu":
        _import_torch_npu()
        if not torch.npu.is_available():  # type: ignore[attr-defined]
            raise ValueError("device 'npu' requested but no Ascend NPU is available")
        return torch.device(name)
    raise ValueError(f"unknown device {name!r} (cpu, cuda[:N] or npu[:N])")


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype for ``float32``/``bfloat16``/``float16``."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def synchronize(device: torch.device) -> None:
    """Waits for queued work on ``device`` (no-op on cpu)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)  # type: ignore[attr-defined]


def dist_backend(device: torch.device | str) -> str:
    """The torch.distributed backend for ranks on ``device``: gloo (cpu), nccl (cuda), hccl (npu)."""
    kind = torch.device(device).type
    if kind == "npu":
        _import_torch_npu()  # registers the hccl backend
    try:
        return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[kind]
    except KeyError:
        raise ValueError(f"no process-group backend for {kind} devices") from None


def rank_device(name: str, local_rank: int) -> str:
    """The device of the ``local_rank``-th rank on a host: ``cuda``/``npu`` without an index become
    ``cuda:N``/``npu:N``; ``cpu`` and an explicit index stay as given."""
    kind, _, index = name.partition(":")
    if kind in ("cuda", "npu") and not index:
        return f"{kind}:{local_rank}"
    return name


def set_current_device(device: torch.device) -> None:
    """Makes ``device`` the process's current accelerator (collectives of nccl/hccl use it)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "npu":
        torch.npu.set_device(device)  # type: ignore[attr-defined]


# torch._int_mm on CUDA (cuBLASLt) needs more than 16 rows and K, N multiples of 8
_CUDA_INT_MM_MIN_ROWS = 17
_CUDA_INT_MM_ALIGN = 8


def _pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] >= size:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [0, size - t.shape[dim]]
    return torch.nn.functional.pad(t, pad)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b [K, N] int8`` -> int32 ``[M, N]``, accumulated exactly (``torch._int_mm``).

    On CUDA the operands are zero-padded to the shapes cuBLASLt accepts (zero rows and columns add
    nothing to the sums) and the result cut back.
    """
    if a.device.type != "cuda":
        return torch._int_mm(a, b)
    return padded_int_mm(a, b)


def padded_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``int_mm`` over operands padded to CUDA's shape rules (rows > 16, K and N multiples of 8)."""
    m, k = a.shape
    n = b.shape[1]
    align = _CUDA_INT_MM_ALIGN
    k_pad, n_pad = -(-k // align) * align, -(-n // align) * align
    a_p = _pad_to(_pad_to(a, 0, _CUDA_INT_MM_MIN_ROWS), 1, k_pad)
    b_p = b if (k_pad, n_pad) == (k, n) else _pad_to(_pad_to(b, 0, k_pad), 1, n_pad)
    out = torch._int_mm(a_p.contiguous(), b_p)
    return out[:m, :n] if out.shape != (m, n) else out


def npu_w8a8(x: torch.Tensor, weight: torch.Tensor, p: dict, scheme: str) -> torch.Tensor:
    """A W8A8 product on Ascend: torch_npu quantizes ``x`` and runs ``npu_quant_matmul``.

    ``weight`` is ``[N, K]`` int8; ``p`` holds the scales as in ``pdmesh.models.int8``. Dynamic:
    ``npu_dynamic_quant`` gives per-token scales, passed as ``pertoken_scale`` with the per-channel
    ``weight_scale``. Static: ``npu_quantize`` with ``1 / input_scale`` and ``input_offset``, then the
    int32 ``quant_bias`` and ``deq_scale`` in the product.
    """
    _import_torch_npu()
    import torch_npu

    bias = p.get("bias")
    if scheme == "dynamic":
        x_q, token_scale = torch_npu.npu_dynamic_quant(x)
        y = torch_npu.npu_quant_matmul(
            x_q, weight.t(), p["weight_scale"], pertoken_scale=token_scale, output_dtype=x.dtype
        )
    else:
        x_q = torch_npu.npu_quantize(x, 1.0 / p["input_scale"], p["input_offset"], torch.qint8, -1, False)
        y = torch_npu.npu_quant_matmul(
            x_q, weight.t(), p["deq_scale"], bias=p["quant_bias"], output_dtype=x.dtype
        )
    return y if bias is None else y + bias
