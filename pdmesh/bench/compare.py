"""``pdmesh bench compare``: one workload against a PD deployment and a colocated one on the same cores.

The PD deployment runs ``--prefill`` prefill and ``--decode`` decode workers; the colocated one runs
``prefill + decode`` mixed workers. Each worker is pinned to ``--cores-per-worker`` cores of its own
(the same cores, in the same order, for both deployments) and runs that many intra-op threads. The
same ``bench serve`` workload (always ``--ignore-eos``, so that both generate the same tokens) runs
against each in turn; both results and the PD/colocated ratios of goodput, throughput and p99
latencies go to a terminal table, ``--json`` and ``--plot``. ``--predict PROFILE.json`` adds what the
planner's simulator predicts for both deployments next to what was measured.

JSON: ``{"workload", "pd": {...bench serve JSON..., "deployment"}, "colocated": {...}, "ratios":
{"goodput", "request_throughput", "output_throughput", "p99_ttft", "p99_tpot", "mean_ttft",
"mean_tpot"}, "prediction": {...} (with --predict)}``. A ratio is PD / colocated (None when the
colocated value is 0): above 1 is better for PD on goodput and throughput, below 1 on latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pdmesh.bench.args import key_value
from pdmesh.bench.metrics import parse_goodput
from pdmesh.bench.serve import BenchConfig, BenchResult, run_benchmark
from pdmesh.extras import MissingExtra

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(".pdmesh/models/qwen3-small")
# (ratio name, metric key in the bench JSON, table label, higher is better)
RATIOS = (
    ("goodput", "request_goodput", "Goodput at the SLO (req/s)", True),
    ("request_throughput", "request_throughput", "Request throughput (req/s)", True),
    ("output_throughput", "output_throughput", "Output throughput (tok/s)", True),
    ("p99_ttft", "p99_ttft_ms", "P99 TTFT (ms)", False),
    ("p99_tpot", "p99_tpot_ms", "P99 TPOT (ms)", False),
    ("mean_ttft", "mean_ttft_ms", "Mean TTFT (ms)", False),
    ("mean_tpot", "mean_tpot_ms", "Mean TPOT (ms)", False),
)


@dataclass(frozen=True)
class Deployment:
    """One side of the comparison: ``mode`` is ``pd`` or ``mixed``; one CPU list per worker (or None)."""

    name: str
    mode: str
    prefill: int
    decode: int
    worker_cpus: list[str] | None

    def label(self) -> str:
        if self.mode == "pd":
            return f"PD {self.prefill}P+{self.decode}D"
        return f"colocated {self.prefill + self.decode}x mixed"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "label": self.label(), "worker_cpus": self.worker_cpus}


def assign_cpus(workers: int, cores_per_worker: int, available: list[int]) -> list[str] | None:
    """Consecutive blocks of ``cores_per_worker`` CPUs of ``available``, one per worker (0: no pinning).

    Raises ValueError when there are not enough CPUs for every worker to have its own.
    """
    if cores_per_worker == 0:
        return None
    if cores_per_worker < 0:
        raise ValueError("--cores-per-worker must be >= 0")
    cpus = sorted(available)
    if workers * cores_per_worker > len(cpus):
        raise ValueError(
            f"{workers} workers x {cores_per_worker} cores need {workers * cores_per_worker} CPUs; "
            f"only {len(cpus)} are available (use fewer workers or --cores-per-worker 0)"
        )
    blocks = [cpus[i * cores_per_worker : (i + 1) * cores_per_worker] for i in range(workers)]
    return [",".join(str(c) for c in block) for block in blocks]


def deployments(prefill: int, decode: int, cores_per_worker: int, available: list[int]) -> list[Deployment]:
    """The PD deployment and the colocated one, on the same CPUs."""
    cpus = assign_cpus(prefill + decode, cores_per_worker, available)
    return [
        Deployment("pd", "pd", prefill, decode, cpus),
        Deployment("colocated", "mixed", prefill, decode, cpus),
    ]


def ratio(pd: float | None, colocated: float | None) -> float | None:
    """``pd / colocated``, or None when either is missing or the colocated value is 0."""
    if pd is None or colocated is None or colocated == 0 or math.isnan(pd) or math.isnan(colocated):
        return None
    return pd / colocated


def compute_ratios(pd: dict[str, Any], colocated: dict[str, Any]) -> dict[str, float | None]:
    """PD / colocated of every compared metric (keys of ``RATIOS``) from two bench serve JSON dicts."""
    return {name: ratio(pd.get(key), colocated.get(key)) for name, key, _, _ in RATIOS}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_comparison(report: dict[str, Any]) -> str:
    """The terminal table: each metric for PD and colocated, and their ratio (with who wins)."""
    pd, col, ratios = report["pd"], report["colocated"], report["ratios"]
    head = f"{'Metric':<30}{pd['deployment']['label']:>18}{col['deployment']['label']:>22}{'PD/coloc':>10}"
    workload = report["workload"]
    lines = [
        " PD vs colocated (same cores) ".center(len(head), "="),
        f"workload: {workload['dataset']} in={workload['input_len']} out={workload['output_len']} "
        f"n={workload['num_prompts']} rate={workload['request_rate']} "
        f"SLO: {' '.join(f'{k}<={v:g}ms' for k, v in workload['goodput'].items()) or 'none'}",
        head,
        "-" * len(head),
    ]
    for name, key, label, higher_better in RATIOS:
        r = ratios[name]
        better = "" if r is None or r == 1 else (" PD" if (r > 1) == higher_better else " col")
        lines.append(f"{label:<30}{_fmt(pd.get(key)):>18}{_fmt(col.get(key)):>22}{_fmt(r):>10}{better}")
    for side in (pd, col):
        lines.append(
            f"{side['deployment']['label']}: {side['completed']} ok, {side['failed']} failed, "
            f"{side['good_completed'] if side['good_completed'] is not None else '-'} met the SLO, "
            f"{side['duration_s']:.1f} s, workers on CPUs {side['deployment']['worker_cpus'] or 'unpinned'}"
        )
    lines += _prediction_lines(report.get("prediction"))
    lines.append("=" * len(head))
    return "\n".join(lines)


def _prediction_lines(prediction: dict[str, Any] | None) -> list[str]:
    if not prediction:
        return []
    lines = ["planner check (simulated from the profile vs measured):"]
    for name in ("pd", "colocated"):
        p = prediction[name]
        lines.append(
            f"  {name:<9} goodput predicted {p['predicted_goodput']:.3f} measured {p['measured_goodput']:.3f} "
            f"req/s (rel. error {_fmt(p['goodput_rel_error'] and p['goodput_rel_error'] * 100, 1)}%); "
            f"attainment {p['predicted_attainment']:.1%} vs {p['measured_attainment']:.1%}"
        )
    return lines


# ----------------------------------------------------------------------------------------- running


def bench_config(args: argparse.Namespace, base_url: str, model_dir: Path) -> BenchConfig:
    """The bench serve configuration of the compared workload against ``base_url``."""
    return BenchConfig(
        base_url=base_url,
        tokenizer=str(model_dir),
        dataset=args.dataset,
        dataset_path=args.dataset_path,
        num_prompts=args.num_prompts,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        ignore_eos=True,
        warmup=args.warmup,
        goodput=parse_goodput(args.goodput),
        seed=args.seed,
        timeout_s=args.timeout_s,
        show_progress=args.show_progress,
    )


def run_deployment(dep: Deployment, args: argparse.Namespace, model_dir: Path) -> BenchResult:
    """Starts ``dep`` as a local stack, runs the workload against it and stops it."""
    from pdmesh.launcher import LocalStack, StackSpec

    spec = StackSpec(
        model_dir=model_dir,
        prefill=dep.prefill,
        decode=dep.decode,
        mode=dep.mode,
        http_port=0,
        log_dir=args.log_dir / dep.name,
        worker_args=dict(args.worker_arg),
        worker_cpus=dep.worker_cpus,
    )
    print(f"running {dep.label()} (workers on CPUs {dep.worker_cpus or 'unpinned'}) ...", file=sys.stderr)
    with LocalStack(spec) as stack:
        return asyncio.run(run_benchmark(bench_config(args, stack.base_url, model_dir)))


def side_report(dep: Deployment, result: BenchResult) -> dict[str, Any]:
    """The bench serve JSON of one side, with its deployment."""
    return {**result.to_dict(), "deployment": dep.to_dict()}


def workload_dict(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dataset": args.dataset,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_prompts": args.num_prompts,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency,
        "goodput": parse_goodput(args.goodput),
        "seed": args.seed,
        "prefill": args.prefill,
        "decode": args.decode,
        "cores_per_worker": args.cores_per_worker,
        "worker_args": dict(args.worker_arg),
    }


def resolve_model(model: Path | None) -> Path:
    """``model``, or the ``small`` preset written (once) into ``DEFAULT_MODEL_DIR``."""
    if model is not None:
        if not (model / "config.json").exists():
            raise ValueError(f"{model} has no config.json (not a Hugging Face checkpoint directory)")
        return model.resolve()
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        from pdmesh.modelgen import write_model

        print(f"writing the small model to {DEFAULT_MODEL_DIR} ...", file=sys.stderr)
        write_model("qwen3", DEFAULT_MODEL_DIR, preset="small")
    return DEFAULT_MODEL_DIR.resolve()


# ----------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The command line: the deployments, the bench serve workload and the reports."""
    p = argparse.ArgumentParser(prog="pdmesh bench compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help=f"checkpoint (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--prefill", type=int, default=1, help="PD prefill workers (default 1)")
    p.add_argument("--decode", type=int, default=1, help="PD decode workers (default 1)")
    p.add_argument("--cores-per-worker", type=int, default=1, help="CPUs pinned per worker (0: no pinning)")
    p.add_argument("--worker-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dataset", default="random", choices=("random", "sharegpt", "gsm8k"))
    p.add_argument("--dataset-path", default=None, metavar="FILE")
    p.add_argument("--input-len", type=int, default=512, help="random prompts' tokens (512)")
    p.add_argument("--output-len", type=int, default=16, help="tokens generated per request (16)")
    p.add_argument("--num-prompts", type=int, default=100, help="measured requests per deployment (100)")
    p.add_argument("--request-rate", type=float, default=2.0, help="Poisson req/s (2; inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests first (2)")
    p.add_argument("--goodput", nargs="+", default=["ttft:1000", "tpot:50"], metavar="NAME:MS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", dest="timeout_s", type=float, default=300.0, help="per request, s")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write both results here")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="side-by-side plot")
    p.add_argument("--predict", type=Path, default=None, metavar="PROFILE.json", help="planner check")
    p.add_argument("--kv-transfer-us-per-token", type=float, default=0.0, help="for --predict (0)")
    p.add_argument("--log-dir", type=Path, default=Path(".pdmesh/logs/compare"))
    p.add_argument("--disable-tqdm", dest="show_progress", action="store_false")
    return p


def _check(args: argparse.Namespace) -> None:
    if args.prefill < 1 or args.decode < 1:
        raise ValueError("--prefill and --decode must be >= 1")
    if args.predict is not None and math.isinf(args.request_rate):
        raise ValueError("--predict needs a finite --request-rate (the simulator models Poisson arrivals)")
    parse_goodput(args.goodput)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Runs both deployments and returns the report (see the module docstring)."""
    model_dir = resolve_model(args.model)
    report: dict[str, Any] = {"workload": {**workload_dict(args), "model": str(model_dir)}}
    available = sorted(os.sched_getaffinity(0))
    for dep in deployments(args.prefill, args.decode, args.cores_per_worker, available):
        report[dep.name] = side_report(dep, run_deployment(dep, args, model_dir))
    report["ratios"] = compute_ratios(report["pd"], report["colocated"])
    if args.predict is not None:
        from pdmesh.bench.compare_predict import predict

        report["prediction"] = predict(args, report)
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point; 0 when both deployments completed requests, 1 when one did not, 2 on bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check(args)
        report = compare(args)
    except (ValueError, RuntimeError, TimeoutError, OSError, httpx.HTTPError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    print(format_comparison(report))
    try:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if args.plot is not None:
            from pdmesh.bench.compare_plot import write_plot

            write_plot(report, args.plot)
    except (OSError, MissingExtra) as exc:
        print(f"{parser.prog}: cannot write the report: {exc}", file=sys.stderr)
        return 2
    return 0 if report["pd"]["completed"] and report["colocated"]["completed"] else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
