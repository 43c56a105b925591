"""``pdmesh bench engine``: offline throughput of the engine, against transformers, with a roofline.

One batch of ``--batch-size`` random prompts of ``--input-len`` tokens, greedy, exactly
``--output-len`` new tokens each (``ignore_eos``). The engine's output tokens/s is ``B * O`` over the
wall time from adding the requests to the last token (prefill included). With ``--reference hf``,
transformers' ``generate`` runs the same prompts on the same checkpoint in the same process (greedy,
``min_new_tokens = max_new_tokens = O``, its DynamicCache) and ``ratio`` is engine over HF. Both sides
run with the same torch intra-op thread count (``--threads``, else torch's default), reported as
``threads``. With ``--repeats N`` each side runs N times, alternating which goes first, and the
report gives medians: ``ratio`` is the median of the N paired ratios (all in ``ratio_runs``), so a
shared host whose speed drifts between the two sides weighs on both alike. ``cpu_kernels`` says
whether the engine ran pdmesh's native CPU kernels (``pdmesh.kernels``). ``--workload`` runs the
engine as that kind of worker does, which picks the CPU linear product (``linear_kernel`` in the
report; ``--linear-kernel`` forces one, see ``pdmesh.engine.linear_choice``). ``engine_prefill_ms``
is the time until every prompt has its first token: with ``--batch-size 1 --output-len 2
--workload prefill``, what a prefill worker takes for one prompt.

Parallel instances: ``--tp/--dp/--moe-ep/--moe-tp/--moe-dispatch`` run the engine as a worker's
leader does (this process is rank 0 and starts the other ranks), and ``comm_fraction`` is the share
of the engine's wall time rank 0 spent inside collectives (waiting for the slowest rank included);
``weight_bytes`` and the roofline are then rank 0's shard, and ``threads`` is per rank (``--threads``,
else the cores shared out over the ranks).

Roofline: a decode step must at least read every weight once (the embedding table only for the
batch's rows) and the K/V of every cached token; at the mean decode context ``I + O/2`` that is
``bytes_per_decode_step``. Over the measured mean decode step time it gives the achieved GB/s; over
this machine's copy bandwidth (a large tensor copy measured in this run, counted as bytes read plus
bytes written) it gives the memory-bound upper limit ``roofline_tokens_per_s``.

Prints one JSON object; bad flags give a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

from pdmesh.accelerator import resolve_device, synchronize
from pdmesh.bench.host import host_info
from pdmesh.bench.roofline import decode_step_bytes, measure_memcpy, roofline
from pdmesh.extras import MissingExtra, require


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser(prog: str = "pdmesh bench engine") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Offline engine throughput against transformers, with a roofline.")
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--batch-size", type=_positive, required=True, help="prompts decoded together")
    p.add_argument("--input-len", type=_positive, required=True, help="prompt tokens per request")
    p.add_argument("--output-len", type=_positive, required=True, help="new tokens per request")
    p.add_argument("--reference", choices=["hf"], default=None, help="also time transformers' generate")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or npu[:N]")
    p.add_argument("--json", action="store_true", help="print the result as JSON (the only format)")
    p.add_argument("--threads", type=_positive, default=None, help="torch intra-op threads")
    p.add_argument("--warmup", action="store_true", help="run each side once untimed first")
    p.add_argument(
        "--repeats", type=_positive, default=1, help="timed runs of each side, alternating (reports medians)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the random prompts")
    p.add_argument("--tp", type=_positive, default=1, help="tensor parallel ranks (docs/parallelism.md)")
    p.add_argument("--dp", type=_positive, default=1, help="data parallel ranks")
    p.add_argument(
        "--moe-ep", type=_positive, default=1, help="expert parallel ranks (1 with --moe-tp 1: dp)"
    )
    p.add_argument(
        "--moe-tp", type=_positive, default=1, help="ranks within each expert (1 with --moe-ep 1: tp)"
    )
    p.add_argument(
        "--moe-dispatch",
        choices=["auto", "all_reduce", "all_gather", "all_to_all"],
        default="auto",
        help="how MoE ranks combine expert outputs",
    )
    p.add_argument(
        "--workload",
        choices=["prefill", "decode", "mixed"],
        default="mixed",
        help="run the engine as this kind of worker does (picks the CPU linear product)",
    )
    p.add_argument(
        "--linear-kernel",
        choices=["auto", "pdmesh", "onednn", "torch"],
        default="auto",
        help="the CPU float32 linear product (auto: measured here for --workload)",
    )
    return p


def make_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(batch)]


def run_engine(engine: Any, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """Generates for every prompt at once; wall times of the whole run and of each decode step, and
    (on a parallel instance) the seconds rank 0 spent in collectives."""
    from pdmesh.engine.types import EngineRequest
    from pdmesh.generation import SamplingParams
    from pdmesh.parallel.state import current

    state = current()
    state.comm_s = 0.0

    sampling = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    synchronize(engine.device)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"bench-{i}", p, sampling))
    steps: list[tuple[int, float]] = []  # (sequences advanced, seconds) once all have a first token
    first_token_s = None
    while engine.has_unfinished():
        s0 = time.perf_counter()
        outs = engine.step()
        synchronize(engine.device)
        if len(outputs) == len(prompts):
            steps.append((len(outs), time.perf_counter() - s0))
        for out in outs:
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
        if first_token_s is None and len(outputs) == len(prompts):
            first_token_s = time.perf_counter() - t0
    total = time.perf_counter() - t0
    full = [t for n, t in steps if n == len(prompts)] or [t for _, t in steps] or [total]
    return {
        "total_s": total,
        "decode_step_s": statistics.mean(full),
        "first_token_s": first_token_s if first_token_s is not None else total,
        "comm_s": state.comm_s,
        "tokens": [outputs[f"bench-{i}"] for i in range(len(prompts))],
    }


def run_hf(model: Any, prompts: list[list[int]], output_len: int, device: torch.device) -> dict[str, Any]:
    """transformers' greedy ``generate`` over the same prompts; its wall time and tokens."""
    ids = torch.tensor(prompts, device=device)
    synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            min_new_tokens=output_len,
            max_new_tokens=output_len,
            pad_token_id=0,
        )
    synchronize(device)
    return {"total_s": time.perf_counter() - t0, "tokens": out[:, ids.shape[1] :].tolist()}


def make_engine(args: argparse.Namespace, prompts: list[list[int]]) -> tuple[Any, Any]:
    """The engine sized for exactly this batch (warmed up when asked), and on several ranks their
    leader (``stop()`` ends them)."""
    from pdmesh.engine.config import EngineConfig
    from pdmesh.engine.engine import LLMEngine

    b, total_len = args.batch_size, args.input_len + args.output_len
    leader = None
    if args.tp * args.dp > 1:
        engine, leader = _parallel_engine(args)
    else:
        config = EngineConfig(
            model_dir=args.model,
            dtype=args.dtype,
            device=args.device,
            max_num_seqs=b,
            max_prefill_batch_size=b,
            max_prefill_tokens=max(b * args.input_len, 1),
            num_blocks=b * (-(-total_len // 16) + 1) + 1,
            max_model_len=total_len,
            enable_prefix_caching=False,
            threads=args.threads,
            workload=args.workload,
            linear_kernel=args.linear_kernel,
        )
        engine = LLMEngine(config)
    if args.warmup:
        run_engine(engine, prompts, min(args.output_len, 4))
    return engine, leader


def _parallel_engine(args: argparse.Namespace) -> tuple[Any, Any]:
    """A parallel instance as a worker builds it: this process is rank 0, the others its children."""
    from pydantic import ValidationError

    from pdmesh.config import WorkerConfig
    from pdmesh.parallel.instance import plan_instance
    from pdmesh.parallel.rank_engine import open_engine

    if args.threads:  # per rank: the ranks this process starts read it too
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    b = args.batch_size
    try:
        config = _worker_config(WorkerConfig, args, b)
    except ValidationError as exc:  # one line, as for any other bad flag
        raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    return open_engine(config, plan_instance(config))


def _worker_config(worker_config: type, args: argparse.Namespace, b: int) -> Any:
    return worker_config(
        controller="127.0.0.1:1",  # never dialled: only the engine runs
        redis_url="redis://127.0.0.1:1",
        model_dir=str(args.model),
        dtype=args.dtype,
        device=args.device,
        max_batch_size=b,
        max_prefill_batch_size=b,
        max_prefill_tokens=max(b * args.input_len, 1),
        tp=args.tp,
        dp=args.dp,
        moe_ep=args.moe_ep,
        moe_tp=args.moe_tp,
        moe_dispatch=args.moe_dispatch,
        role=args.workload,
        linear_kernel=args.linear_kernel,
    )


def load_hf(args: argparse.Namespace, prompts: list[list[int]], device: torch.device) -> Any:
    """transformers' model of the same checkpoint (warmed up when asked)."""
    require("transformers", "bench", "--reference hf")
    from transformers import AutoModelForCausalLM

    from pdmesh.accelerator import resolve_dtype

    model = (
        AutoModelForCausalLM.from_pretrained(args.model, dtype=resolve_dtype(args.dtype)).to(device).eval()
    )
    if args.warmup:
        run_hf(model, prompts, min(args.output_len, 4), device)
    return model


def alternate(args: argparse.Namespace, prompts, engine, hf_model, device) -> tuple[list[dict], list[dict]]:
    """``--repeats`` timed runs of each side, the first side alternating between repetitions, so
    that a host whose speed drifts (a shared machine) weighs on both sides alike."""
    eng_runs: list[dict[str, Any]] = []
    hf_runs: list[dict[str, Any]] = []
    for r in range(args.repeats):
        order = ["engine", "hf"] if r % 2 == 0 else ["hf", "engine"]
        for side in order:
            if side == "engine":
                eng_runs.append(run_engine(engine, prompts, args.output_len))
            elif hf_model is not None:
                hf_runs.append(run_hf(hf_model, prompts, args.output_len, device))
    return eng_runs, hf_runs


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the engine (and the reference) and returns the JSON report."""
    from pdmesh.kernels.build import load as load_cpu_kernels

    device = resolve_device(args.device)
    threads = args.threads or torch.get_num_threads()  # both sides run with exactly this many
    torch.set_num_threads(threads)
    vocab = int(json.loads((args.model / "config.json").read_text())["vocab_size"])
    prompts = make_prompts(args.batch_size, args.input_len, vocab, args.seed)
    b, o = args.batch_size, args.output_len
    engine, leader = make_engine(args, prompts)
    threads = torch.get_num_threads()  # a parallel instance's ranks share the cores (per rank)
    linear_kernel = engine.runner.linear_kernel
    try:
        hf_model = load_hf(args, prompts, device) if args.reference == "hf" else None
        eng_runs, hf_runs = alternate(args, prompts, engine, hf_model, device)
        weights, kv = decode_step_bytes(engine, b, args.input_len + o / 2)
        layout = _layout_report(args, leader)
    finally:
        if leader is not None:
            leader.stop()
    del engine, hf_model
    eng_total = statistics.median(r["total_s"] for r in eng_runs)
    step_s = statistics.median(r["decode_step_s"] for r in eng_runs)
    report: dict[str, Any] = {
        "model": str(args.model),
        "batch_size": b,
        "input_len": args.input_len,
        "output_len": o,
        "device": args.device,
        "dtype": args.dtype,
        "threads": threads,
        "cpu_kernels": device.type == "cpu" and args.dtype == "float32" and load_cpu_kernels() is not None,
        "repeats": args.repeats,
        "engine_total_s": eng_total,
        "engine_output_tokens_per_s": b * o / eng_total,
        "engine_decode_step_ms": step_s * 1e3,
        "engine_prefill_ms": statistics.median(r["first_token_s"] for r in eng_runs) * 1e3,
        "workload": args.workload,
        "linear_kernel": linear_kernel,
        **layout,
        "comm_fraction": statistics.median(r["comm_s"] / r["total_s"] for r in eng_runs),
    }
    if hf_runs:
        ratios = [h["total_s"] / e["total_s"] for e, h in zip(eng_runs, hf_runs, strict=True)]
        hf_total = statistics.median(r["total_s"] for r in hf_runs)
        same = sum(a == h for a, h in zip(eng_runs[0]["tokens"], hf_runs[0]["tokens"], strict=True))
        report |= {
            "hf_total_s": hf_total,
            "hf_output_tokens_per_s": b * o / hf_total,
            "ratio": statistics.median(ratios),
            "ratio_runs": ratios,
            "greedy_sequences_equal_to_hf": f"{same}/{b}",
        }
    else:
        report |= {"hf_total_s": None, "hf_output_tokens_per_s": None, "ratio": None}
    report |= roofline(weights, kv, step_s, b, measure_memcpy(device))
    return report


def _layout_report(args: argparse.Namespace, leader: Any) -> dict[str, Any]:
    """The instance's shape: one rank, or the layout and dispatch its ranks ran."""
    if leader is None:
        return {"world": 1, "tp": 1, "dp": 1, "moe_ep": 1, "moe_tp": 1, "moe_dispatch": None}
    state = leader.state
    layout = state.layout
    return {
        "world": layout.world,
        "tp": layout.tp,
        "dp": layout.dp,
        "moe_ep": layout.moe_ep,
        "moe_tp": layout.moe_tp,
        "moe_dispatch": state.moe_dispatch if layout.dims.num_experts else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and prints its JSON; 2 on bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"{parser.prog}: error: {args.model} has no config.json", file=sys.stderr)
        return 2
    try:
        report = {**benchmark(args), **host_info()}
    except (ValueError, MissingExtra) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=None if not args.json else 1, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
