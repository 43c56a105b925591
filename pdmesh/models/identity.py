"""A checkpoint's identity for KV sharing: the same weights give the same digest wherever they lie.

Two engines may hand KV to each other only when they run the same weights. The directory's name says
nothing about that (two pods may mount one checkpoint at different paths; two fine-tunes may share a
name), and hashing every weight byte of a large checkpoint at start-up is too slow. The digest covers
``config.json`` and, for each safetensors file in name order, its size, its header (every tensor's
name, dtype, shape and offsets) and up to ``SAMPLE_BYTES`` of tensor data from its start, middle
and end: copies agree, and checkpoints with other weights differ (a fine-tune changes every tensor).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

SAMPLE_BYTES = 1 << 16
DIGEST_CHARS = 12


def _sample_file(digest: Any, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        digest.update(f.read(header_len))
        data_start = 8 + header_len
        span = size - data_start
        for offset in (0, span // 2, max(span - SAMPLE_BYTES, 0)):
            f.seek(data_start + offset)
            digest.update(f.read(min(SAMPLE_BYTES, span)))


def checkpoint_digest(model_dir: Path | str) -> str:
    """A short hex digest of the checkpoint in ``model_dir`` (config and sampled weights)."""
    path = Path(model_dir)
    digest = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    digest.update(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(path.glob("*.safetensors")):
        _sample_file(digest, weights)
    return digest.hexdigest()[:DIGEST_CHARS]
