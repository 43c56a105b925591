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
