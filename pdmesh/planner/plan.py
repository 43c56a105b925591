"""``pdmesh plan``: the P:D split (or colocated serving) that maximizes goodput per instance.

The search itself is in ``pdmesh.planner.search`` (three bisections on per-instance rates, then every
split of the budget in closed form, so a budget of hundreds of instances costs the same). Here the
recommendation and a table of the best split per instance count are simulated end to end at the
offered rate (attainment, goodput, latencies), printed, and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pdmesh.planner.model import LatencyModel
from pdmesh.planner.profile_file import load_profile
from pdmesh.planner.search import (
    Candidate,
    best_split,
    best_unit,
    capacity_guess,
    max_colocated_rate,
    max_decode_rate,
    max_prefill_rate,
    min_instances,
    phase_target,
    recommend,
)
from pdmesh.planner.simulate import (
    SLO,
    LengthDist,
    Limits,
    Requests,
    Workload,
    simulate_colocated,
    simulate_pd,
)


def simulate_candidate(
    cand: Candidate, model: LatencyModel, workload: Workload, slo: SLO, limits: Limits, reqs: Requests
):
    if cand.mode == "colocated":
        return simulate_colocated(model, workload, slo, limits, cand.n_prefill, reqs)
    return simulate_pd(model, workload, slo, limits, cand.n_prefill, cand.n_decode, reqs)


def _table_totals(r_p: float, r_d: float, rate: float, budget: int, top: int) -> list[int]:
    """Instance counts for the table: from the fewest PD instances meeting the rate (or the budget's end)."""
    if budget < 2:
        return []
    first = 2
    if r_p > 0 and r_d > 0:
        first = max(math.ceil(rate / r_p - 1e-9), 1) + max(math.ceil(rate / r_d - 1e-9), 1)
    first = max(2, min(first - 1, budget - top + 1))
    return list(range(first, min(budget, first + top - 1) + 1))


def plan(
    model: LatencyModel,
    workload: Workload,
    slo: SLO,
    limits: Limits,
    budget: int,
    want_min_instances: bool = False,
    top: int = 8,
) -> dict[str, Any]:
    """Searches every split within ``budget`` and the colocated option; returns the plan as a dict."""
    started = time.perf_counter()
    reqs = Requests.sample(workload)
    cap_p, cap_d = capacity_guess(model, workload, limits)
    target = phase_target(slo.attainment)
    r_p = max_prefill_rate(model, reqs, slo, limits, target, cap_p)
    r_d = max_decode_rate(model, reqs, slo, limits, target, cap_d)
    r_c = max_colocated_rate(model, reqs, slo, limits, 1 / (1 / cap_p + 1 / cap_d))
    rate = workload.rate

    def simulated(cand: Candidate) -> dict[str, Any]:
        return {
            **cand.to_dict(),
            "simulated": simulate_candidate(cand, model, workload, slo, limits, reqs).to_dict(),
        }

    rec = recommend(r_p, r_d, r_c, rate, budget)
    result: dict[str, Any] = {
        "per_instance_max_rate": {"prefill": r_p, "decode": r_d, "colocated": r_c},
        "phase_attainment_target": target,
        "best_unit": Candidate("pd", *best_unit(r_p, r_d, budget), rate).to_dict() if budget >= 2 else None,
        "recommendation": simulated(rec),
        "colocated_same_count": simulated(Candidate("colocated", rec.total, 0, rec.total * r_c, rate)),
        "table": [],
    }
    for n in _table_totals(r_p, r_d, rate, budget, top):
        sim = simulate_candidate(
            cand := Candidate("pd", *best_split(n, r_p, r_d), rate), model, workload, slo, limits, reqs
        )
        result["table"].append(
            {
                **cand.to_dict(),
                "attainment": sim.attainment,
                "goodput": sim.goodput,
                "ttft_p90_ms": sim.ttft_ms["p90"],
                "tpot_p90_ms": sim.tpot_ms["p90"],
                "colocated_max_rate": n * r_c,
            }
        )
    if want_min_instances:
        smallest = min_instances(r_p, r_d, r_c, rate, budget)
        result["min_instances"] = simulated(smallest) if smallest else None
    result["elapsed_s"] = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------------------------- CLI


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pdmesh plan",
        description="Recommend prefill and decode instance counts for a workload and SLOs.",
    )
    p.add_argument("--profile", type=Path, required=True, help="profile JSON written by `pdmesh profile`")
    p.add_argument("--rate", type=float, required=True, help="offered load, requests/s (Poisson)")
    p.add_argument(
        "--input-len",
        required=True,
        help="prompt lengths: N, fixed:N, uniform:LO,HI, empirical:A,B,.. or @FILE",
    )
    p.add_argument("--output-len", required=True, help="output lengths (same forms as --input-len)")
    p.add_argument("--ttft-ms", type=float, required=True, help="time-to-first-token SLO, ms")
    p.add_argument("--tpot-ms", type=float, required=True, help="time-per-output-token SLO, ms")
    p.add_argument(
        "--attainment", type=float, default=0.9, help="fraction of requests that must meet both SLOs (0.9)"
    )
    p.add_argument("--budget", type=int, required=True, help="most instances to use (prefill + decode)")
    p.add_argument(
        "--min-instances", action="store_true", help="also report the fewest instances meeting the rate"
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=None,
        help="tokens per prefill batch (default: the profile's)",
    )
    p.add_argument("--max-prefill-batch-size", type=int, default=None, help="prompts per prefill batch")
    p.add_argument("--max-decode-batch-size", type=int, default=None, help="sequences per decode batch")
    p.add_argument(
        "--kv-transfer-us-per-token", type=float, default=0.0, help="KV transfer time per prompt token, us"
    )
    p.add_argument("--num-requests", type=int, default=2000, help="simulated requests per run (2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=8, help="rows in the table (8)")
    p.add_argument("--json", type=Path, default=None, help="write the plan here")
    return p


def _check(args: argparse.Namespace) -> None:
    checks = [
        (args.rate > 0, "--rate must be > 0"),
        (args.ttft_ms > 0 and args.tpot_ms > 0, "--ttft-ms and --tpot-ms must be > 0"),
        (0 < args.attainment <= 1, "--attainment must be in (0, 1]"),
        (args.budget >= 1, "--budget must be >= 1"),
        (args.num_requests >= 20, "--num-requests must be >= 20"),
        (args.top >= 0, "--top must be >= 0"),
        (args.kv_transfer_us_per_token >= 0, "--kv-transfer-us-per-token must be >= 0"),
    ]
    for name in ("max_prefill_tokens", "max_prefill_batch_size", "max_decode_batch_size"):
        value = getattr(args, name)
        checks.append((value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1"))
    for ok, message in checks:
        if not ok:
            raise _UsageError(message)


def limits_from(args: argparse.Namespace, profile: dict[str, Any]) -> Limits:
    """CLI limits, else the ones the profile was measured with, else the defaults."""
    meta, default = profile.get("metadata", {}), Limits()

    def pick(flag, key, fallback):
        return int(flag if flag is not None else meta.get(key) or fallback)

    return Limits(
        max_prefill_tokens=pick(args.max_prefill_tokens, "max_prefill_tokens", default.max_prefill_tokens),
        max_prefill_batch_size=pick(
            args.max_prefill_batch_size, "max_prefill_batch_size", default.max_prefill_batch_size
        ),
        max_decode_batch_size=pick(args.max_decode_batch_size, "max_num_seqs", default.max_decode_batch_size),
        kv_transfer_s_per_token=args.kv_transfer_us_per_token / 1e6,
    )


def format_table(result: dict[str, Any], rate: float) -> str:
    """The best PD split per instance count (simulated at ``rate``) and the recommendation."""
    head = (
        f"{'total':>5}{'P':>5}{'D':>5}{'PD req/s':>10}{'per inst':>10}{'meets':>7}"
        f"{'attain':>8}{'p90 TTFT':>10}{'p90 TPOT':>10}{'coloc req/s':>13}"
    )
    lines = [f"best PD split per instance count, simulated at {rate:g} req/s:", head, "-" * len(head)]
    for r in result["table"]:
        lines.append(
            f"{r['total']:>5}{r['n_prefill']:>5}{r['n_decode']:>5}"
            f"{r['max_rate']:>10.2f}{r['goodput_per_instance']:>10.3f}"
            f"{'yes' if r['meets_rate'] else 'no':>7}{r['attainment']:>8.1%}{r['ttft_p90_ms']:>8.0f}ms"
            f"{r['tpot_p90_ms']:>8.1f}ms{r['colocated_max_rate']:>13.2f}"
        )
    rates = result["per_instance_max_rate"]
    lines.append(
        f"one instance sustains: prefill {rates['prefill']:.3f}, decode {rates['decode']:.3f}, "
        f"colocated {rates['colocated']:.3f} req/s"
    )
    if result.get("best_unit"):
        unit = result["best_unit"]
        lines.append(
            f"most efficient PD unit: {unit['n_prefill']}P:{unit['n_decode']}D "
            f"({unit['goodput_per_instance']:.3f} req/s per instance)"
        )
    rec, col = result["recommendation"], result["colocated_same_count"]
    sim = rec["simulated"]
    what = (
        f"{rec['n_prefill']} colocated"
        if rec["mode"] == "colocated"
        else f"{rec['n_prefill']} prefill + {rec['n_decode']} decode"
    )
    lines.append(
        f"recommended: {what} instances (sustains {rec['max_rate']:.2f} req/s; at {rate:g} req/s: "
        f"attainment {sim['attainment']:.1%}, goodput {sim['goodput']:.2f} req/s, "
        f"p90 TTFT {sim['ttft_ms']['p90']:.0f} ms, p90 TPOT {sim['tpot_ms']['p90']:.1f} ms)"
    )
    if rec["mode"] == "pd":
        lines.append(
            f"colocated with {col['total']} instances: sustains {col['max_rate']:.2f} req/s, "
            f"attainment {col['simulated']['attainment']:.1%} at {rate:g} req/s"
        )
    if not rec["meets_rate"]:
        lines.append(
            f"warning: {result['inputs']['budget']} instances cannot sustain {rate:g} req/s within the SLOs"
        )
    if "min_instances" in result:
        mi = result["min_instances"]
        lines.append(
            "fewest instances meeting the rate: none within the budget"
            if mi is None
            else f"fewest instances meeting the rate: {mi['total']} "
            f"({mi['mode']}: P={mi['n_prefill']} D={mi['n_decode']})"
        )
    return "\n".join(lines)


def main_plan(argv: list[str] | None = None) -> int:
    """Entry point of ``pdmesh plan``; returns the exit status (2 on bad flags or files)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        _check(args)
        workload = Workload(
            args.rate,
            LengthDist.parse(args.input_len),
            LengthDist.parse(args.output_len),
            args.num_requests,
            args.seed,
        )
        profile = load_profile(args.profile)
        model = (
            LatencyModel.from_dict(profile["latency_model"])
            if "latency_model" in profile
            else LatencyModel.fit(profile)
        )
        limits = limits_from(args, profile)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (_UsageError, ValueError, KeyError, TypeError) as exc:
        print(f"pdmesh plan: error: {exc}", file=sys.stderr)
        return 2
    slo = SLO(args.ttft_ms, args.tpot_ms, args.attainment)
    result = plan(model, workload, slo, limits, args.budget, args.min_instances, args.top)
    result = {
        "inputs": {
            "profile": str(args.profile),
            "rate": args.rate,
            "input_len": str(workload.input_len),
            "output_len": str(workload.output_len),
            "slo": asdict(slo),
            "limits": asdict(limits),
            "budget": args.budget,
            "num_requests": args.num_requests,
            "seed": args.seed,
        },
        "latency_model": model.to_dict(),
        **result,
    }
    print(format_table(result, args.rate))
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as exc:
            print(f"pdmesh plan: error: cannot write {args.json}: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main_plan())
