"""Known latency coefficients, a synthetic profile drawn from them, and simple latency models for
the planner's tests."""

from __future__ import annotations

import numpy as np

from pdmesh.planner.model import DecodeModel, LatencyModel, PrefillModel

PREFILL = (0.01, 1e-4, 2e-8)  # a + b*tokens + c*sum(len^2)
DECODE = (0.02, 2e-4, 1e-7)  # alpha + beta*batch + gamma*batch*context


def synthetic_profile(noise: float = 0.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    a, b, c = PREFILL
    al, be, ga = DECODE
    jitter = lambda: 1 + noise * rng.standard_normal()  # noqa: E731
    prefill = [
        {
            "batch_tokens": n * L,
            "num_seqs": n,
            "prompt_len": L,
            "sum_sq_len": n * L * L,
            "latency_s": (a + b * n * L + c * n * L * L) * jitter(),
        }
        for L in (32, 64, 128, 256, 512, 1024)
        for n in (1, 2, 4, 8)
        if n * L <= 8192
    ]
    decode = [
        {"batch_size": B, "context_len": C, "step_latency_s": (al + be * B + ga * B * C) * jitter()}
        for B in (1, 2, 4, 8, 16, 32)
        for C in (64, 256, 1024)
    ]
    return {"schema": "pdmesh.profile/1", "metadata": {"device": "cpu"}, "prefill": prefill, "decode": decode}


def flat_model(prefill_s: float = 0.05, step_s: float = 0.02) -> LatencyModel:
    """Constant service times: every prefill batch costs ``prefill_s``, every decode step ``step_s``."""
    return LatencyModel(PrefillModel(coef=[prefill_s, 0.0, 0.0]), DecodeModel(alpha=step_s))


def linear_model() -> LatencyModel:
    return LatencyModel(PrefillModel(coef=list(PREFILL)), DecodeModel(*DECODE))
