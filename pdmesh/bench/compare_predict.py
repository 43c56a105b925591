"""The planner check of ``pdmesh bench compare --predict PROFILE.json``.

The simulator of ``pdmesh plan`` (``simulate_pd`` / ``simulate_colocated``) predicts both deployments
for the measured workload: the same Poisson rate, the request lengths the run actually sent (as an
empirical distribution), the goodput SLOs and the workers' batch limits. Predicted goodput is
``rate x attainment``; measured goodput is bench serve's ``request_goodput`` (requests meeting every
SLO per second of the run). The relative error is ``(predicted - measured) / measured``. As a finite
Poisson run's realised rate differs from the nominal one (and its duration includes the drain),
``attainment_x_rate`` (measured attainment x nominal rate, the simulator's own definition) and its error
are reported too.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pdmesh.bench.metrics import parse_goodput
from pdmesh.planner.model import LatencyModel
from pdmesh.planner.profile_file import load_profile
from pdmesh.planner.simulate import (
    SLO,
    LengthDist,
    Limits,
    SimResult,
    Workload,
    simulate_colocated,
    simulate_pd,
)

SIM_REQUESTS = 2000  # as `pdmesh plan` simulates by default
NO_LIMIT_MS = 1e12


def load_model(path: Path) -> LatencyModel:
    """The latency model of a profile (or of a plan JSON that already holds a fitted one)."""
    profile = load_profile(path)
    if "latency_model" in profile:
        return LatencyModel.from_dict(profile["latency_model"])
    return LatencyModel.fit(profile)


def worker_limits(worker_args: dict[str, str], kv_us_per_token: float = 0.0) -> Limits:
    """The simulator's limits from the workers' flags (``WorkerConfig``'s defaults where not given)."""
    from pdmesh.config import WorkerConfig

    fields = WorkerConfig.model_fields

    def value(name: str) -> int:
        return int(worker_args.get(name.replace("_", "-"), fields[name].default))

    return Limits(
        max_prefill_tokens=value("max_prefill_tokens"),
        max_prefill_batch_size=value("max_prefill_batch_size"),
        max_decode_batch_size=value("max_batch_size"),
        kv_transfer_s_per_token=kv_us_per_token / 1e6,
    )


def measured_lengths(
    side: dict[str, Any], fallback_in: int, fallback_out: int
) -> tuple[LengthDist, LengthDist]:
    """The prompt and output lengths a run sent, or the configured ones if no request succeeded."""
    lens = side.get("per_request", {})
    inputs, outputs = lens.get("input_lens") or [fallback_in], lens.get("output_lens") or [fallback_out]
    return LengthDist("empirical", tuple(inputs)), LengthDist("empirical", tuple(outputs))


def rel_error(predicted: float, measured: float) -> float | None:
    """``(predicted - measured) / measured``; None when nothing was measured."""
    return None if measured <= 0 else (predicted - measured) / measured


def compare_side(sim: SimResult, measured: dict[str, Any]) -> dict[str, Any]:
    """Predicted next to measured for one deployment (``sim.rate`` is the nominal rate)."""
    total = measured["completed"] + measured["failed"]
    good = measured.get("request_goodput") or 0.0
    attainment = (measured.get("good_completed") or 0) / total if total else 0.0
    return {
        "predicted_goodput": sim.goodput,
        "measured_goodput": good,
        "goodput_rel_error": rel_error(sim.goodput, good),
        "measured_attainment_x_rate": attainment * sim.rate,
        "attainment_x_rate_rel_error": rel_error(sim.goodput, attainment * sim.rate),
        "predicted_attainment": sim.attainment,
        "measured_attainment": attainment,
        "predicted_stable": sim.stable,
        "predicted_ttft_ms": sim.ttft_ms,
        "predicted_tpot_ms": sim.tpot_ms,
        "measured_ttft_ms": {"mean": measured["mean_ttft_ms"], "p99": measured["p99_ttft_ms"]},
        "measured_tpot_ms": {"mean": measured["mean_tpot_ms"], "p99": measured["p99_tpot_ms"]},
    }


def predict(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    """Simulates both deployments of ``report``'s workload and sets the predictions next to the runs."""
    model = load_model(args.predict)
    input_len, output_len = measured_lengths(report["pd"], args.input_len, args.output_len)
    workload = Workload(args.request_rate, input_len, output_len, SIM_REQUESTS, args.seed)
    slos = parse_goodput(args.goodput)
    slo = SLO(slos.get("ttft", NO_LIMIT_MS), slos.get("tpot", NO_LIMIT_MS))
    limits = worker_limits(dict(args.worker_arg), args.kv_transfer_us_per_token)
    pd = simulate_pd(model, workload, slo, limits, args.prefill, args.decode)
    colocated = simulate_colocated(model, workload, slo, limits, args.prefill + args.decode)
    return {
        "profile": str(args.predict),
        "simulated_requests": SIM_REQUESTS,
        "limits": limits.__dict__,
        "pd": compare_side(pd, report["pd"]),
        "colocated": compare_side(colocated, report["colocated"]),
    }
