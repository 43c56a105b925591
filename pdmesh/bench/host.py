"""The host a benchmark ran on, recorded in every benchmark JSON (``bench serve``, ``engine``,
``transfer``, ``compare``, ``soak``, ``eplb``, ``profile``) so that numbers from different machines are
never compared blind: the CPU model, its cores, the vector-instruction flags that decide which
kernels are fast (AVX2, AVX-512, AMX), and the torch build.

``host_info()`` answers ``{"cpu": {"model", "cores", "flags": {"avx2", "fma", "avx512f",
"avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"}, "capability", "torch"}}``. ``flags`` come from ``/proc/cpuinfo`` on
Linux (all False elsewhere, or where a flag is not listed); ``capability`` is the vector level
torch's CPU kernels dispatch to (``torch.backends.cpu.get_cpu_capability()``: ``AVX2``, ``AVX512``,
``DEFAULT``...), None without torch; ``torch`` is its version, None without it.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
CPUINFO = Path("/proc/cpuinfo")


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """The first processor's model name and flags in a ``/proc/cpuinfo`` text."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if model is not None and flags:
            break
    return model, flags


def _torch() -> tuple[str | None, str | None]:
    try:
        import torch
    except ImportError:
        return None, None
    capability = None
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # older builds have no such query
        pass
    return torch.__version__, capability


@functools.cache
def _cpu() -> dict[str, Any]:
    try:
        model, flags = parse_cpuinfo(CPUINFO.read_text(encoding="utf-8", errors="replace"))
    except OSError:  # not Linux
        model, flags = None, set()
    version, capability = _torch()
    return {
        "model": model or platform.processor() or platform.machine() or None,
        "cores": os.cpu_count(),
        "flags": {name: name in flags for name in FLAGS},
        "capability": capability,
        "torch": version,
    }


def host_info() -> dict[str, Any]:
    """``{"cpu": {...}}`` of this host (see the module docstring); a fresh copy each call."""
    cpu = _cpu()
    return {"cpu": {**cpu, "flags": dict(cpu["flags"])}}
