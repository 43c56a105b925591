"""The search behind ``pdmesh plan``: per-instance rate limits by bisection, then every split in closed form.

Round robin over instances makes each phase scale linearly with its instance count, so ONE prefill
instance (TTFT attainment), ONE decode instance (TPOT attainment) and ONE colocated instance (both) are
bisected for the highest rate they sustain; ``np`` prefill and ``nd`` decode instances then sustain
``min(np*r_p, nd*r_d)`` req/s. Each phase must reach ``1 - (1 - attainment)/2`` so that the joint
attainment is at least the target (union bound). The best split of each instance count lies at the
floor or ceiling of the crossing point ``n*r_d/(r_p+r_d)``, so scoring every count up to the budget is
O(budget). A rate counts as sustained only when the instance also keeps up with it (``keeps_up``), so
that a short simulated run cannot pass a loose SLO while its queue grows without bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pdmesh.planner.model import LatencyModel
from pdmesh.planner.simulate import (
    SLO,
    Limits,
    Requests,
    Workload,
    decode_tpot,
    keeps_up,
    prefill_ttft,
    run_colocated,
)

REL_TOL = 0.005  # bisection stops when the rate is known to 0.5%


def phase_target(attainment: float) -> float:
    """Per-phase attainment that guarantees the joint one (union bound over the two misses)."""
    return 1.0 - (1.0 - attainment) / 2.0


def _bisect(ok: Callable[[float], bool], guess: float, rel_tol: float = REL_TOL) -> float:
    """Highest rate for which ``ok`` holds (0 when even a trickle fails); ``guess`` seeds the bracket."""
    guess = guess if guess > 0 and math.isfinite(guess) else 1.0
    if not ok(guess * 1e-3):
        return 0.0
    lo, hi = guess * 1e-3, guess
    for _ in range(40):
        if not ok(hi):
            break
        lo, hi = hi, hi * 2
    else:
        return lo
    for _ in range(60):
        if hi - lo <= rel_tol * hi:
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def capacity_guess(model: LatencyModel, workload: Workload, limits: Limits) -> tuple[float, float]:
    """Rough request throughputs of one prefill and one decode instance (bisection seeds)."""
    mean_in, mean_out = workload.input_len.mean(), workload.output_len.mean()
    k = max(1, min(limits.max_prefill_batch_size, int(limits.max_prefill_tokens // max(mean_in, 1))))
    cap_p = k / model.prefill_latency(k * mean_in, k * mean_in**2)
    b = limits.max_decode_batch_size
    step = model.decode_step_latency(b, mean_in + mean_out / 2)
    cap_d = b / (max(mean_out - 1, 1) * step)
    return cap_p, cap_d


def max_prefill_rate(
    model: LatencyModel, reqs: Requests, slo: SLO, limits: Limits, target: float, guess: float
) -> float:
    """Highest rate one prefill instance serves with ``target`` of its TTFTs within the SLO."""

    def ok(rate: float) -> bool:
        ttft, arr = prefill_ttft(model, reqs, rate, limits)
        met = float(np.mean(ttft[len(ttft) // 10 :] <= slo.ttft_ms / 1000))
        return met >= target and keeps_up(arr, arr + ttft, limits.max_prefill_batch_size)

    return _bisect(ok, guess)


def max_decode_rate(
    model: LatencyModel, reqs: Requests, slo: SLO, limits: Limits, target: float, guess: float
) -> float:
    """Highest rate one decode instance serves with ``target`` of its TPOTs within the SLO."""

    def ok(rate: float) -> bool:
        tpot, finish = decode_tpot(model, reqs, rate, limits)
        met = float(np.mean(tpot[len(tpot) // 10 :] <= slo.tpot_ms / 1000))
        stable = keeps_up(reqs.arrivals(rate, "decode"), finish, limits.max_decode_batch_size)
        return met >= target and stable

    return _bisect(ok, guess)


def max_colocated_rate(model: LatencyModel, reqs: Requests, slo: SLO, limits: Limits, guess: float) -> float:
    """Highest rate one colocated instance serves with ``slo.attainment`` of requests meeting both SLOs."""

    def ok(rate: float) -> bool:
        arr = reqs.arrivals(rate)
        ttft, tpot, finish = run_colocated(model, arr, reqs.input_len, reqs.output_len, limits)
        met = (ttft <= slo.ttft_ms / 1000) & (tpot <= slo.tpot_ms / 1000)
        return float(np.mean(met[len(met) // 10 :])) >= slo.attainment and keeps_up(
            arr, finish, limits.max_decode_batch_size
        )

    return _bisect(ok, guess)


@dataclass
class Candidate:
    """One configuration, the rate it sustains within the SLOs, and the offered rate."""

    mode: str  # "pd" or "colocated" (then n_prefill holds the instance count)
    n_prefill: int
    n_decode: int
    max_rate: float
    rate: float

    @property
    def total(self) -> int:
        return self.n_prefill + self.n_decode

    @property
    def per_instance(self) -> float:
        return self.max_rate / self.total if self.total else 0.0

    @property
    def meets_rate(self) -> bool:
        return self.max_rate >= self.rate * (1 - 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "total": self.total,
            "goodput_per_instance": self.per_instance,
            "meets_rate": self.meets_rate,
        }


def _best_splits(totals: np.ndarray, r_p: float, r_d: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each instance count, the P:D split with the highest ``min(p*r_p, d*r_d)``."""
    cross = totals * r_d / (r_p + r_d) if r_p + r_d > 0 else totals / 2
    options = [np.clip(f(cross), 1, totals - 1) for f in (np.floor, np.ceil)]
    rates = [np.minimum(p * r_p, (totals - p) * r_d) for p in options]
    p = np.where(rates[1] > rates[0], options[1], options[0]).astype(np.int64)
    return p, totals - p, np.maximum(rates[0], rates[1])


def best_split(n: int, r_p: float, r_d: float) -> tuple[int, int, float]:
    """The P:D split of ``n`` (>= 2) instances with the highest sustained rate."""
    p, d, rate = _best_splits(np.array([n]), r_p, r_d)
    return int(p[0]), int(d[0]), float(rate[0])


def best_unit(r_p: float, r_d: float, budget: int, tol: float = 0.02) -> tuple[int, int, float]:
    """DistServe's unit: the split (np + nd <= budget) with the highest goodput per instance.

    Splits within ``tol`` of the best are ties and the smallest of them wins: replicas of a small unit
    track the offered rate more closely than one large unit.
    """
    totals = np.arange(2, max(budget, 2) + 1)
    p, d, rates = _best_splits(totals, r_p, r_d)
    per = rates / totals
    i = int(np.flatnonzero(per >= per.max() * (1 - tol))[0])
    return int(p[i]), int(d[i]), float(rates[i])


def min_instances(r_p: float, r_d: float, r_c: float, rate: float, budget: int) -> Candidate | None:
    """The fewest instances (PD split or colocated) that sustain ``rate``; None when the budget cannot."""
    options = []
    if r_p > 0 and r_d > 0:
        n_p, n_d = max(math.ceil(rate / r_p - 1e-9), 1), max(math.ceil(rate / r_d - 1e-9), 1)
        options.append(Candidate("pd", n_p, n_d, min(n_p * r_p, n_d * r_d), rate))
    if r_c > 0:
        n_c = max(math.ceil(rate / r_c - 1e-9), 1)
        options.append(Candidate("colocated", n_c, 0, n_c * r_c, rate))
    options = [c for c in options if c.total <= budget]
    return min(options, key=lambda c: (c.total, -c.max_rate)) if options else None


def recommend(r_p: float, r_d: float, r_c: float, rate: float, budget: int) -> Candidate:
    """The most efficient unit (PD or colocated) replicated to meet ``rate``.

    When replicas of the unit do not fit the budget: the fewest instances meeting the rate if any
    fit, else the budget split that sustains the highest rate.
    """
    unit = (
        Candidate("pd", *best_unit(r_p, r_d, budget), rate) if budget >= 2 and r_p > 0 and r_d > 0 else None
    )
    if unit is None or r_c > unit.per_instance:
        n = max(math.ceil(rate / r_c - 1e-9), 1) if r_c > 0 else budget
        if n <= budget:
            return Candidate("colocated", n, 0, n * r_c, rate)
    else:
        k = max(math.ceil(rate / unit.max_rate - 1e-9), 1)
        if k * unit.total <= budget:
            return Candidate("pd", k * unit.n_prefill, k * unit.n_decode, k * unit.max_rate, rate)
    smallest = min_instances(r_p, r_d, r_c, rate, budget)
    if smallest is not None:
        return smallest
    colocated = Candidate("colocated", budget, 0, budget * r_c, rate)
    if budget < 2:
        return colocated
    pd = Candidate("pd", *best_split(budget, r_p, r_d), rate)
    return pd if pd.max_rate >= colocated.max_rate else colocated
