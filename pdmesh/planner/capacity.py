"""What one instance can carry, from the planner's latency model: the controller's ``auto`` P:D
ratio uses this so that it and ``pdmesh plan`` reason with the same measured model.

It reads a profile file and fits the latency model (``profile_file``, ``model``): nothing here
imports the profiler or the engine, so the controller can use it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pdmesh.planner.model import LatencyModel
from pdmesh.planner.profile_file import load_profile

MAX_DECODE_BATCH = 4096


@dataclass(frozen=True)
class InstanceCapacity:
    prefill_tokens_per_s: float  # prompt tokens/s one prefill instance sustains at full batches
    decode_batch: int  # the largest decode batch whose step latency meets the TPOT target


def capacity_from_model(
    model: LatencyModel, prefill_batch_tokens: int, tpot_ms: float, context_len: int
) -> InstanceCapacity:
    """Prefill: tokens per second at a full prefill batch; decode: the largest batch within TPOT."""
    prefill_rate = prefill_batch_tokens / model.prefill_latency(prefill_batch_tokens)
    batch = 1
    while batch < MAX_DECODE_BATCH and model.decode_step_latency(batch + 1, context_len) * 1000 <= tpot_ms:
        batch += 1
    return InstanceCapacity(prefill_tokens_per_s=prefill_rate, decode_batch=batch)


def capacity_from_profile(path: Path | str, tpot_ms: float, context_len: int) -> InstanceCapacity:
    """Reads a ``pdmesh profile`` JSON (raises ValueError naming the problem) and derives capacity."""
    profile = load_profile(path)
    model = LatencyModel.fit(profile)
    batch_tokens = int(profile.get("metadata", {}).get("max_prefill_tokens") or 2048)
    return capacity_from_model(model, batch_tokens, tpot_ms, context_len)
