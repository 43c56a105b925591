"""The `pdmesh` command: the local stack, the checkpoint writer and every service's entry point."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from pdmesh.launcher_metrics import DEFAULT_COORDINATOR_METRICS_PORT
from pdmesh.logs import setup_logging

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(".pdmesh/models/qwen3-small")
SERVICES = {
    "controller": "services.controller.main",
    "coordinator": "services.coordinator.main",
}
# `pdmesh worker --role R` runs the worker service; the role-named commands fix its starting role.
WORKER_ROLES = {
    "worker": None,
    "prefill-worker": "prefill",
    "decode-worker": "decode",
    "mixed-worker": "mixed",
}
# `pdmesh up --prefill-tp N ...`: each role's instance layout (env twins PDMESH_UP_PREFILL_TP ...)
PARALLEL_SIZES = ("tp", "dp", "moe-ep", "moe-tp")
PARALLEL_FLAGS = [(role, name) for role in ("prefill", "decode") for name in PARALLEL_SIZES]
# Tools with their own argument parsers: `pdmesh <name> ...` hands the rest of the line to them.
TOOLS = {
    ("bench", "serve"): ("pdmesh.bench.serve", "main"),
    ("bench", "transfer"): ("pdmesh.bench.transfer", "main"),
    ("bench", "engine"): ("pdmesh.bench.engine", "main"),
    ("bench", "compare"): ("pdmesh.bench.compare", "main"),
    ("bench", "soak"): ("pdmesh.bench.soak", "main"),
    ("bench", "eplb"): ("pdmesh.bench.eplb", "main"),
    ("profile",): ("pdmesh.planner.profile", "main_profile"),
    ("plan",): ("pdmesh.planner.plan", "main_plan"),
    ("deploy",): ("pdmesh.deploy.cli", "main"),
    ("certs",): ("pdmesh.security.cli", "main"),
    ("quantize",): ("pdmesh.quantize", "main"),
}


def _up_parser(sub) -> None:
    p = sub.add_parser("up", help="start the whole local stack (Redis, controller, workers, coordinator)")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a cluster file (JSON or YAML, see docs/deploy.md); the flags below override its keys",
    )
    p.add_argument(
        "--model", type=Path, default=None, help=f"checkpoint directory (default: writes {DEFAULT_MODEL_DIR})"
    )
    p.add_argument("--prefill", type=int, default=None, help="prefill workers (default 1)")
    p.add_argument("--decode", type=int, default=None, help="decode workers (default 1)")
    p.add_argument(
        "--mode", choices=["pd", "mixed"], default=None, help="mixed: prefill+decode colocated workers"
    )
    p.add_argument("--host", default=None, help="address every service binds (default 127.0.0.1)")
    p.add_argument(
        "--http-port", type=int, default=None, help="the OpenAI-compatible HTTP port (default 8000)"
    )
    p.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="the coordinator's Prometheus port, serving /metrics/mesh for the whole stack "
        f"(default {DEFAULT_COORDINATOR_METRICS_PORT}, or the cluster file's observability.metrics_port; "
        "0: a free one); the other services take free ports",
    )
    p.add_argument("--log-dir", type=Path, default=Path(".pdmesh/logs"), help="where each service logs")
    p.add_argument(
        "--transfer-backend",
        choices=["tcp", "shm", "device", "cuda_ipc", "mooncake"],
        default=None,
        help="how KV moves (default tcp)",
    )
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="leave the workers unpinned (default: decode workers get cores of their own, prefill "
        "workers run on every core, one thread per core; see docs/deploy.md)",
    )
    p.add_argument(
        "--no-restart",
        dest="restart",
        action="store_false",
        help="leave a worker that dies dead (default: restart it, backing off while it keeps crashing)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS on every gRPC link and the KV transfer, HTTPS on the API port; certificates "
        "in --tls-dir (written when absent or not valid for --host); see docs/security.md",
    )
    p.add_argument(
        "--tls-dir", type=Path, default=None, help="with --tls: certificates (default .pdmesh/tls)"
    )
    p.add_argument(
        "--api-key-file", type=Path, default=None, help="API keys the coordinator requires, one per line"
    )
    for role, name in PARALLEL_FLAGS:
        p.add_argument(
            f"--{role}-{name}",
            type=int,
            default=os.environ.get(f"PDMESH_UP_{role.upper()}_{name.upper().replace('-', '_')}"),
            help=f"{name} ranks of each {role}"
            + (" (and mixed)" if role == "prefill" else "")
            + f" instance; env PDMESH_UP_{role.upper()}_{name.upper().replace('-', '_')}",
        )


def _parallel_role_args(args: argparse.Namespace) -> dict[str, dict[str, str]] | str:
    """The --prefill-*/--decode-* settings as worker flags by role, or the problem with them."""
    from pdmesh.parallel.layout import LayoutError, check_numbers

    by_role: dict[str, dict[str, str]] = {}
    for role in ("prefill", "decode"):
        given = {n: getattr(args, f"{role}_{n.replace('-', '_')}") for n in PARALLEL_SIZES}
        sizes = {n: v for n, v in given.items() if v is not None}
        if any(v < 1 for v in sizes.values()):
            return f"--{role}-* sizes must be >= 1, got {sizes}"
        tp, dp = sizes.get("tp", 1), sizes.get("dp", 1)
        ep, mtp = sizes.get("moe-ep", 1), sizes.get("moe-tp", 1)
        if ep * mtp == 1:
            ep, mtp = dp, tp  # the workers' default: MoE layers follow the attention layout
        try:
            check_numbers(tp * dp, tp, dp, ep, mtp)
        except LayoutError as exc:
            return f"{role} instances: {exc}"
        by_role[role] = {n: str(v) for n, v in sizes.items()}
    by_role["mixed"] = by_role["prefill"]
    return by_role


def _make_model_parser(sub) -> None:
    p = sub.add_parser("make-model", help="write a small random checkpoint in Hugging Face layout")
    p.add_argument("--arch", default="qwen3", help="model family")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--preset", default="small", help="size preset: tiny, small or bench")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _up_parser(sub)
    _make_model_parser(sub)
    sub.add_parser(
        "ctl",
        help="administer the controller: list, top, set-ratio, drain, undrain, flip; a worker's experts",
        add_help=False,
    )
    for name in [*SERVICES, *WORKER_ROLES]:
        sub.add_parser(name, help=f"run the {name} service (see `pdmesh {name} --help`)", add_help=False)
    bench = sub.add_parser(
        "bench", help="benchmarks: serve, transfer, engine, compare, soak, eplb (see `pdmesh bench X --help`)"
    )
    bench.add_argument("what", choices=sorted(k[1] for k in TOOLS if k[0] == "bench"))
    sub.add_parser(
        "profile", help="measure the engine on this hardware (see `pdmesh profile --help`)", add_help=False
    )
    sub.add_parser(
        "plan", help="recommend prefill and decode instance counts (see `pdmesh plan --help`)", add_help=False
    )
    sub.add_parser(
        "deploy", help="render docker-compose or Kubernetes manifests from a cluster file", add_help=False
    )
    sub.add_parser(
        "certs",
        help="write a CA and the services' TLS certificates; revoke one (see `pdmesh certs --help`)",
        add_help=False,
    )
    return parser


def cmd_make_model(args: argparse.Namespace) -> int:
    from pdmesh.modelgen import write_model

    try:
        out = write_model(args.arch, args.out, preset=args.preset, dtype=args.dtype, seed=args.seed)
    except (ValueError, OSError) as exc:
        print(f"pdmesh make-model: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.arch} ({args.preset}) to {out}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from pdmesh.launcher import LocalStack

    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        print(f"pdmesh up: --metrics-port must be in [0, 65535], got {args.metrics_port}", file=sys.stderr)
        return 2
    if args.config is not None:
        spec = _spec_from_cluster_file(args)
    else:
        spec = _spec_from_flags(args)
    if isinstance(spec, int):
        return spec
    parallel = _parallel_role_args(args)
    if isinstance(parallel, str):
        print(f"pdmesh up: {parallel}", file=sys.stderr)
        return 2
    for role, flags in parallel.items():
        spec.role_args[role] = {**spec.role_args.get(role, {}), **flags}
    spec.pin_workers = args.pin
    _one_host_defaults(spec)
    from pdmesh.launcher_tls import apply_up_flags

    problem = apply_up_flags(spec, args.tls, args.tls_dir, args.api_key_file)
    if problem:
        print(f"pdmesh up: {problem}", file=sys.stderr)
        return 2
    return _run_stack(LocalStack(spec))


# what a PD stack on one host runs unless told otherwise (docs/benchmarks.md measured them):
# a decode worker prefills a prompt itself while the prefill workers are busy, in small chunks
# between its decode steps, instead of the prompt queueing behind the busy prefill worker
ONE_HOST_COORDINATOR = {"overflow-prefill-tokens": "1024"}
ONE_HOST_DECODE = {"max-prefill-tokens": "64"}


def _one_host_defaults(spec) -> None:
    """``pdmesh up``'s serving defaults under any flag or cluster-file key that sets them."""
    spec.coordinator_args = {**ONE_HOST_COORDINATOR, **spec.coordinator_args}
    spec.role_args["decode"] = {**ONE_HOST_DECODE, **spec.role_args.get("decode", {})}


def _spec_from_cluster_file(args: argparse.Namespace):
    """The StackSpec of ``--config FILE`` with the given flags over its keys, or exit status 2."""
    from pdmesh.deploy.cluster_file import ClusterFileError, load_cluster_file
    from pdmesh.deploy.local import UpOverrides, stack_spec

    over = UpOverrides(**{k: getattr(args, k) for k in UpOverrides.__dataclass_fields__})
    try:
        spec = stack_spec(load_cluster_file(args.config), over, args.log_dir, args.restart)
    except ClusterFileError as exc:
        print(f"pdmesh up: {exc}", file=sys.stderr)
        return 2
    if not (spec.model_dir / "config.json").exists():
        print(
            f"pdmesh up: {spec.model_dir} has no config.json (modelWeightPath in {args.config})",
            file=sys.stderr,
        )
        return 2
    return spec


def _spec_from_flags(args: argparse.Namespace):
    from pdmesh.launcher import StackSpec
    from pdmesh.modelgen import write_model

    model_dir = args.model
    if model_dir is None:
        model_dir = DEFAULT_MODEL_DIR
        if not (model_dir / "config.json").exists():
            print(f"writing the demo model to {model_dir} ...", flush=True)
            write_model("qwen3", model_dir, preset="small")
    elif not (model_dir / "config.json").exists():
        print(
            f"pdmesh up: {model_dir} has no config.json (not a Hugging Face checkpoint directory)",
            file=sys.stderr,
        )
        return 2
    try:
        spec = StackSpec(
            model_dir=model_dir.resolve(),
            prefill=1 if args.prefill is None else args.prefill,
            decode=1 if args.decode is None else args.decode,
            mode=args.mode or "pd",
            host=args.host or "127.0.0.1",
            http_port=8000 if args.http_port is None else args.http_port,
            redis_url=args.redis_url,
            log_dir=args.log_dir,
            worker_args={"transfer-backend": args.transfer_backend} if args.transfer_backend else {},
            restart_workers=args.restart,
            metrics_port=DEFAULT_COORDINATOR_METRICS_PORT if args.metrics_port is None else args.metrics_port,
        )
    except ValueError as exc:
        print(f"pdmesh up: {exc}", file=sys.stderr)
        return 2
    return spec


def _run_stack(stack) -> int:
    from pdmesh.launcher_tls import ready_hint

    stopping = {"flag": False}

    def on_signal(signum, frame):
        stopping["flag"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
        print(f"pdmesh ready: {stack.base_url}", flush=True)
        for line in ready_hint(stack.spec, stack.base_url):
            print(line, flush=True)
        if stack.spec.metrics_port is not None:
            print(f"metrics: http://{stack.metrics_address('coordinator')}/metrics/mesh", flush=True)
        print(f"logs in {stack.log_dir}; Ctrl-C stops everything", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"pdmesh up: {exc}", file=sys.stderr)
        stack.stop()
        return 1
    stack.stop()
    return 0


def _tool(argv: list[str]):
    """The (module, function, remaining argv) of a tool command, or None."""
    for key, target in TOOLS.items():
        if tuple(argv[: len(key)]) == key:
            return (*target, argv[len(key) :])
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tool = _tool(argv)
    if tool is not None:
        import importlib

        module, function, rest = tool
        return getattr(importlib.import_module(module), function)(rest) or 0
    if argv and argv[0] == "ctl":
        from services.controller.ctl import main as ctl_main

        return ctl_main(argv[1:])
    if argv and argv[0] in SERVICES:
        import importlib

        return importlib.import_module(SERVICES[argv[0]]).main(argv[1:])
    if argv and argv[0] in WORKER_ROLES:
        from services.worker.main import run_worker  # lazily: the library never imports a service

        return run_worker(argv[1:], role=WORKER_ROLES[argv[0]])
    args = build_parser().parse_args(argv)
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the launcher's health polls are not news
    if args.command == "make-model":
        return cmd_make_model(args)
    return cmd_up(args)


if __name__ == "__main__":
    sys.exit(main())
