"""The profile JSON that ``pdmesh profile`` writes and the planner and the controller read: its
schema, checks, loading and saving. Nothing here measures: reading a profile needs no engine.

Profile JSON (``schema: pdmesh.profile/1``)::

    {"schema": "pdmesh.profile/1",
     "metadata": {"device", "device_name", "model_dir", "dtype", "torch_threads", "torch_version",
                  "date", "hostname", "model": {...config.json summary...}, "block_size",
                  "max_prefill_tokens", "max_prefill_batch_size", "max_num_seqs" (largest measured),
                  "engine_options": {...EngineConfig kwargs...}, "repeats", "warmup", "stat",
                  "decode_steps", "elapsed_s"},
     "prefill": [{"batch_tokens", "num_seqs", "prompt_len", "sum_sq_len", "latency_s", "steps"}],
     "decode": [{"batch_size", "prompt_len", "context_len", "step_latency_s", "steps_timed"}],
     "fit": {...LatencyModel.to_dict()...}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA = "pdmesh.profile/1"


def validate_profile(profile: Any) -> dict[str, Any]:
    """Checks a profile's shape; raises ValueError with a one-line reason."""
    if not isinstance(profile, dict):
        raise ValueError("a profile is a JSON object")
    if "latency_model" in profile:
        return profile  # an already fitted model (e.g. a plan's JSON)
    required = {
        "prefill": ("batch_tokens", "num_seqs", "latency_s"),
        "decode": ("batch_size", "context_len", "step_latency_s"),
    }
    for section, keys in required.items():
        points = profile.get(section)
        if not isinstance(points, list) or len(points) < 2:
            raise ValueError(f"the profile needs at least 2 {section} points")
        for i, point in enumerate(points):
            if not isinstance(point, dict) or any(not isinstance(point.get(k), int | float) for k in keys):
                raise ValueError(f"{section} point {i} needs numeric {', '.join(keys)}")
            if any(point[k] <= 0 for k in keys):
                raise ValueError(f"{section} point {i} has a non-positive value")
    return profile


def load_profile(path: Path | str) -> dict[str, Any]:
    """Reads and validates a profile JSON; raises ValueError with a one-line reason."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read profile {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"profile {path} is not JSON: {exc}") from None
    try:
        return validate_profile(data)
    except ValueError as exc:
        raise ValueError(f"profile {path}: {exc}") from None


def save_profile(profile: dict[str, Any], path: Path | str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(validate_profile(profile), indent=2) + "\n")
