"""Builds the CPU kernels (``csrc/*.c``) once per source and compiler, and loads them.

The library is compiled at first use with the system C compiler (``$CC``, else ``cc``) for
AVX2 + FMA with OpenMP, into ``$PDMESH_KERNEL_CACHE`` (default ``~/.cache/pdmesh/kernels``; the
temporary directory where that cannot be created) under a
name that hashes the source, the flags and the compiler, so a changed source is rebuilt and
concurrent processes never load a half-written file (each writes its own temporary file and
renames it into place). ``torch`` is imported first, so the library's ``libgomp.so.1`` resolves to
the OpenMP runtime PyTorch already loaded and both share one thread pool.

Before any kernel runs, ``load`` checks the library's interface report against its ctypes mirror
(``abi``: a version symbol, each mirrored struct's size and field offsets). Without a compiler, on a
CPU without AVX2/FMA, with ``PDMESH_CPU_KERNELS=0``, or when that check fails, ``load`` returns None
(the reason logged once) and the models keep their PyTorch expressions.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch

from pdmesh.kernels import abi

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "cpu_ops.c", CSRC / "decode_layer.c", CSRC / "abi.c"]
HEADERS = [CSRC / "cpu_ops.h", CSRC / "decode_layer.h", CSRC / "abi.h"]
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
SWITCH = "PDMESH_CPU_KERNELS"
COMPILE_TIMEOUT_S = 120


def cache_dir() -> Path:
    """Where built libraries are kept."""
    configured = os.environ.get("PDMESH_KERNEL_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pdmesh" / "kernels"


def cpu_supported() -> bool:
    """True on x86-64 CPUs where PyTorch itself dispatches AVX2 (or AVX-512) kernels."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def compiler() -> str | None:
    """The C compiler to use, or None when there is none."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def build(cc: str) -> Path:
    """The library for the current source, compiled now unless already in the cache."""
    text = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
    key = hashlib.sha256(text + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_ops-{key}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: the temporary directory, per user
        target = _private_temp_dir() / target.name
        if target.exists():
            return target
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        subprocess.run(
            [cc, *FLAGS, "-o", str(tmp), *map(str, SOURCES)],
            check=True,
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
        )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("built CPU kernels %s", target)
    return target


def _private_temp_dir() -> Path:
    """``$TMPDIR/pdmesh-kernels-<uid>``, made 0700; refused (``OSError``) when another user owns it
    or others may write to it, since a library found there would be loaded into this process."""
    path = Path(tempfile.gettempdir()) / f"pdmesh-kernels-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise OSError(f"{path} is not a private directory of this user; not loading kernels from it")
    return path


@functools.cache
def load() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it cannot be used here (the reason is logged)."""
    if os.environ.get(SWITCH, "1") == "0":
        logger.info("CPU kernels off (%s=0)", SWITCH)
        return None
    if not cpu_supported():
        logger.info("CPU kernels need an x86-64 CPU with AVX2; using PyTorch ops")
        return None
    cc = compiler()
    if cc is None:
        logger.warning("no C compiler found ($CC or cc); CPU kernels off, using PyTorch ops")
        return None
    try:
        lib = ctypes.CDLL(str(build(cc)))
    except subprocess.CalledProcessError as exc:
        logger.warning("CPU kernels failed to compile; using PyTorch ops: %s", exc.stderr.strip()[-500:])
        return None
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("CPU kernels unavailable; using PyTorch ops: %s", exc)
        return None
    reason = abi.mismatch(lib)
    if reason is not None:
        logger.warning(
            "CPU kernels refused: their C interface differs from pdmesh/kernels/abi.py (%s); using PyTorch ops",
            reason,
        )
        return None
    abi.bind(lib)
    return lib
