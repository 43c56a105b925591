"""``pdmesh bench compare``: one workload against a PD deployment and a colocated one on the same cores,
and against any OpenAI-compatible server (``--peer-url``, e.g. vLLM) on the same host.

The PD deployment runs ``--prefill`` prefill and ``--decode`` decode workers; the colocated one runs
``prefill + decode`` mixed workers (``--deployments pd,mixed`` picks them; both by default). Each
worker is pinned to ``--cores-per-worker`` cores of its own (the same cores, in the same order, for
both deployments) and runs that many intra-op threads. The same ``bench serve`` workload (always
``--ignore-eos``, so that every side generates the same tokens) runs against each in turn, then
against the peer (started by the user, under ``--model-name`` or the first model it lists); the
results and the ratios of goodput, throughput and latencies go to a terminal table, ``--json`` and
``--plot``. ``--predict PROFILE.json`` adds what the planner's simulator predicts for both
deployments next to what was measured.

JSON: ``{"workload", "cpu" (host.py), "pd": {...bench serve JSON..., "deployment"}, "colocated":
{...}, "ratios": {"goodput", "request_throughput", "output_throughput", "p99_ttft", "p99_tpot",
"mean_ttft", "mean_tpot"}, "peers": {name: {...bench serve JSON..., "deployment": {"mode": "peer",
"url"}}}, "peer_ratios": {name: {"pd": {...}, "colocated": {...}}}, "prediction": {...} (with
--predict)}``; a side not run is absent, and so are the ratios needing it. A ratio is ours / theirs
(PD / colocated, pdmesh / peer; None when theirs is 0): above 1 is better for ours on goodput and
throughput, below 1 on latencies.
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
from pdmesh.bench.compare_peer import Peer, check_peer, run_peer
from pdmesh.bench.compare_table import RATIOS, compute_ratios, format_comparison, ratio  # noqa: F401
from pdmesh.bench.host import host_info
from pdmesh.bench.metrics import parse_goodput
from pdmesh.bench.serve import BenchConfig, BenchResult, run_benchmark
from pdmesh.extras import MissingExtra

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(".pdmesh/models/qwen3-small")
MODES = {"pd": "pd", "mixed": "colocated"}  # --deployments names -> the report's keys


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


def parse_deployments(text: str) -> list[str]:
    """``--deployments``: a comma-separated subset of ``pd`` and ``mixed``; the report keys, in order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in MODES]
    if bad or not names:
        raise ValueError(f"--deployments takes pd and/or mixed (comma-separated), not {text!r}")
    return [key for name, key in MODES.items() if name in names]


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


def side_report(dep: Deployment | Peer, result: BenchResult) -> dict[str, Any]:
    """The bench serve JSON of one side, with its deployment."""
    deployment = dep.deployment() if isinstance(dep, Peer) else dep.to_dict()
    return {**result.to_dict(), "deployment": deployment}


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
        "deployments": parse_deployments(args.deployments),
        "peer_url": args.peer_url,
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
    p.add_argument("--deployments", default="pd,mixed", help="which pdmesh deployments: pd,mixed (both)")
    p.add_argument("--peer-url", default=None, metavar="URL", help="an OpenAI-compatible server to add")
    p.add_argument("--peer-name", default=None, metavar="NAME", help="its name in the reports (peer)")
    p.add_argument("--model-name", default=None, metavar="NAME", help="the peer's model name (its first)")
    p.add_argument("--peer-api-key", default=None, metavar="KEY", help="bearer token for the peer")
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
    chosen = parse_deployments(args.deployments)
    if args.predict is not None and len(chosen) < 2:
        raise ValueError("--predict needs both deployments (--deployments pd,mixed)")
    if args.peer_url is None and (args.peer_name or args.model_name or args.peer_api_key):
        raise ValueError("--peer-name, --model-name and --peer-api-key need --peer-url")


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the deployments, then the peer, and returns the report (see the module docstring)."""
    peer = None
    if args.peer_url is not None:  # checked before anything starts: a bad URL fails at once
        peer = check_peer(args.peer_url, args.peer_name, args.model_name, args.peer_api_key)
    model_dir = resolve_model(args.model)
    report: dict[str, Any] = {"workload": {**workload_dict(args), "model": str(model_dir)}, **host_info()}
    available = sorted(os.sched_getaffinity(0))
    chosen = parse_deployments(args.deployments)
    for dep in deployments(args.prefill, args.decode, args.cores_per_worker, available):
        if dep.name in chosen:
            report[dep.name] = side_report(dep, run_deployment(dep, args, model_dir))
    if "pd" in report and "colocated" in report:
        report["ratios"] = compute_ratios(report["pd"], report["colocated"])
    if peer is not None:
        print(f"running {peer.name} at {peer.url} (model {peer.model}) ...", file=sys.stderr)
        side = side_report(peer, run_peer(peer, bench_config(args, peer.url, model_dir)))
        report["peers"] = {peer.name: side}
        report["peer_ratios"] = {peer.name: {key: compute_ratios(report[key], side) for key in chosen}}
    if args.predict is not None:
        from pdmesh.bench.compare_predict import predict

        report["prediction"] = predict(args, report)
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point; 0 when every side completed requests, 1 when one did not, 2 on bad usage."""
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
    measured = [report[key] for key in ("pd", "colocated") if key in report]
    measured += list(report.get("peers", {}).values())
    return 0 if all(side["completed"] for side in measured) else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
