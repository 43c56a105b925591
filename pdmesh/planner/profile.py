"""``pdmesh profile``: measures the engine's prefill and decode latencies on this machine.

Prefill: batches of ``num_seqs`` prompts of ``prompt_len`` tokens in PREFILL mode, timed until every
prompt has its first token. Decode: ``batch_size`` sequences of ``prompt_len`` tokens in MIXED mode,
timed per step once all have their first token (see ``pdmesh.planner.measure``). Each prefill shape runs
``warmup`` times untimed, then ``repeats`` times; a point keeps the minimum (the default: robust to a
busy machine) or the median of its runs.

The profile JSON's shape is described in ``pdmesh.planner.profile_file``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pdmesh.bench.host import host_info
from pdmesh.planner.measure import EngineBench, decode_statistic, default_engine, kv_mib_needed, model_summary
from pdmesh.planner.profile_file import SCHEMA, save_profile

DEFAULT_PROMPT_LENS = (32, 64, 128, 256, 512, 1024)
DEFAULT_BATCH_SIZES = (1, 2, 4, 8)
DEFAULT_DECODE_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
DEFAULT_CONTEXT_LENS = (64, 256, 1024)


# ------------------------------------------------------------------------------------ measuring


def _fitting(lengths: Sequence[int], limit: int, what: str, say: Callable[[str], None]) -> list[int]:
    """The lengths that fit the model's context (raises when none does)."""
    kept = [n for n in lengths if n <= limit]
    if len(kept) < len(lengths):
        say(f"skipping {what} lengths above {limit} (the model's context)")
    if not kept:
        raise ValueError(f"no {what} length fits the model's context ({limit} tokens)")
    return kept


def _prefill_shapes(
    prompt_lens: Sequence[int], batch_sizes: Sequence[int], max_batch_tokens: int
) -> list[tuple[int, int]]:
    shapes = [(b, n) for n in prompt_lens for b in batch_sizes if b * n <= max_batch_tokens]
    return shapes or [(1, min(prompt_lens))]


def run_profile(
    model_dir: Path | str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    prompt_lens: Sequence[int] = DEFAULT_PROMPT_LENS,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    max_batch_tokens: int = 8192,
    decode_batch_sizes: Sequence[int] = DEFAULT_DECODE_BATCH_SIZES,
    context_lens: Sequence[int] = DEFAULT_CONTEXT_LENS,
    decode_steps: int = 8,
    warmup: int = 1,
    repeats: int = 3,
    stat: str = "min",
    kv_cache_memory_mib: int | None = None,
    block_size: int | None = None,
    progress: Callable[[str], None] | None = None,
    engine_factory: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """Profiles the engine on ``model_dir`` and returns the profile dict (see the module docstring).

    ``engine_factory`` builds the engine from the EngineConfig options (default: ``LLMEngine``).
    """
    import torch

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"{model_dir} has no config.json (not a Hugging Face checkpoint directory)")
    say = progress or (lambda _msg: None)
    reduce = {"min": min, "median": statistics.median}[stat]
    started = time.perf_counter()
    summary = model_summary(model_dir)
    max_len = summary["max_position_embeddings"]
    prompt_lens = _fitting(prompt_lens, max_len - 1, "prompt", say)
    context_lens = _fitting(context_lens, max_len - 2 - warmup - decode_steps, "context", say)
    shapes = _prefill_shapes(prompt_lens, batch_sizes, max_batch_tokens)
    max_tokens = max(b * n for b, n in shapes)
    decode_tokens = max(decode_batch_sizes) * (max(context_lens) + warmup + decode_steps + 2)
    kv_mib = kv_cache_memory_mib or kv_mib_needed(summary, max(max_tokens, decode_tokens), dtype)
    max_seqs = max(max(decode_batch_sizes), max(b for b, _ in shapes))
    options: dict[str, Any] = {
        "model_dir": str(model_dir),
        "dtype": dtype,
        "device": device,
        "kv_cache_memory_mib": kv_mib,
        "max_num_seqs": max_seqs,
        "max_prefill_batch_size": max_seqs,
        "max_prefill_tokens": max(max_tokens, max(context_lens) * max(decode_batch_sizes)),
    }
    if block_size is not None:
        options["block_size"] = block_size
    engine = (engine_factory or default_engine)(options)
    bench = EngineBench(engine, summary["vocab_size"])
    say("warming up")
    bench.prefill(1, min(prompt_lens))
    bench.decode(1, min(context_lens), 0, 2)

    prefill = _measure_prefill(bench, shapes, warmup, repeats, reduce, say)
    decode_shapes = [(b, c) for b in decode_batch_sizes for c in context_lens]
    decode = _measure_decode(bench, decode_shapes, warmup, repeats, decode_steps, stat, say)

    profile: dict[str, Any] = {
        "schema": SCHEMA,
        "metadata": {
            "device": device,
            "device_name": _device_name(device, torch),
            "model_dir": str(model_dir.resolve()),
            "dtype": dtype,
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "hostname": platform.node(),
            "model": summary,
            "block_size": getattr(getattr(engine, "config", None), "block_size", block_size),
            # the largest batches measured: `pdmesh plan` takes them as default limits
            "max_prefill_tokens": max_tokens,
            "max_prefill_batch_size": max(b for b, _ in shapes),
            "max_num_seqs": max(decode_batch_sizes),
            "engine_options": options,
            "repeats": repeats,
            "warmup": warmup,
            "stat": stat,
            "decode_steps": decode_steps,
            "elapsed_s": round(time.perf_counter() - started, 3),
        },
        "prefill": prefill,
        "decode": decode,
        **host_info(),  # the CPU's model, cores and vector flags (pdmesh.bench.host)
    }
    _attach_fit(profile)
    return profile


def _measure_prefill(
    bench: EngineBench, shapes, warmup: int, repeats: int, reduce, say
) -> list[dict[str, Any]]:
    """Prefill points. Repeats go round all shapes, so that a burst of load on the machine spoils one
    run of several shapes rather than every run of one (the minimum then drops it)."""
    for shape in shapes:
        for _ in range(warmup):  # each new shape pays one-off costs (allocations, kernel selection)
            bench.prefill(*shape)
    runs: dict[tuple[int, int], list[tuple[float, int]]] = {shape: [] for shape in shapes}
    for _ in range(max(repeats, 1)):
        for shape in shapes:
            runs[shape].append(bench.prefill(*shape))
    points = []
    for (num_seqs, prompt_len), shape_runs in runs.items():
        latency = reduce([r[0] for r in shape_runs])
        points.append(
            {
                "batch_tokens": num_seqs * prompt_len,
                "num_seqs": num_seqs,
                "prompt_len": prompt_len,
                "sum_sq_len": num_seqs * prompt_len**2,
                "latency_s": latency,
                "steps": max(r[1] for r in shape_runs),
            }
        )
        say(f"prefill {num_seqs}x{prompt_len}: {latency * 1000:.1f} ms")
    return points


def _measure_decode(
    bench: EngineBench, shapes, warmup: int, repeats: int, steps: int, stat: str, say
) -> list[dict[str, Any]]:
    """Decode points (batch size, prompt length); repeats go round all shapes like prefill's."""
    runs: dict[tuple[int, int], list[list[float]]] = {shape: [] for shape in shapes}
    for _ in range(max(repeats, 1)):
        for batch, context in shapes:
            runs[(batch, context)].append(bench.decode(batch, context, warmup, steps))
    points = []
    for (batch, context), shape_runs in runs.items():
        step = decode_statistic(shape_runs, stat)
        if step is None:
            say(f"decode {batch}x{context}: no step advanced the whole batch; skipped")
            continue
        points.append(
            {
                "batch_size": batch,
                "prompt_len": context,
                # the mean context the timed steps attended: prompt + tokens generated so far
                "context_len": context + warmup + (steps + 1) / 2,
                "step_latency_s": step,
                "steps_timed": sum(len(r) for r in shape_runs),
            }
        )
        say(f"decode {batch}x{context}: {step * 1000:.2f} ms/step")
    return points


def _device_name(device: str, torch: Any) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def _attach_fit(profile: dict[str, Any]) -> None:
    """Adds the fitted latency model (informational; ``pdmesh plan`` refits from the points)."""
    from pdmesh.planner.model import LatencyModel

    if len(profile["prefill"]) >= 2 and len(profile["decode"]) >= 2:
        profile["fit"] = LatencyModel.fit(profile).to_dict()


# ------------------------------------------------------------------------------------ CLI


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pdmesh profile",
        description="Measure prefill and decode latencies of the engine on this machine.",
    )
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--out", type=Path, required=True, help="profile JSON to write")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, npu ... (cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--prompt-lens", type=_ints, default=list(DEFAULT_PROMPT_LENS), help="prefill prompt lengths"
    )
    p.add_argument(
        "--batch-sizes", type=_ints, default=list(DEFAULT_BATCH_SIZES), help="prompts per prefill batch"
    )
    p.add_argument(
        "--max-batch-tokens", type=int, default=8192, help="skip prefill batches above this many tokens"
    )
    p.add_argument("--decode-batch-sizes", type=_ints, default=list(DEFAULT_DECODE_BATCH_SIZES))
    p.add_argument(
        "--context-lens", type=_ints, default=list(DEFAULT_CONTEXT_LENS), help="decode prompt lengths"
    )
    p.add_argument("--decode-steps", type=int, default=8, help="timed decode steps per point (8)")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed runs per prefill point and decode steps (1)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (3)")
    p.add_argument(
        "--stat",
        choices=["min", "median"],
        default="min",
        help="what a point keeps of its runs (min: robust to a busy machine)",
    )
    p.add_argument(
        "--kv-cache-mib", type=int, default=None, help="KV cache size (default: what the largest point needs)"
    )
    p.add_argument("--block-size", type=int, default=None, help="KV block size (default: the engine's)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="a few small points only (smoke test)")
    return p


_RUN_FLAGS = (
    "device", "dtype", "prompt_lens", "batch_sizes", "max_batch_tokens", "decode_batch_sizes",
    "context_lens", "decode_steps", "warmup", "repeats", "stat", "block_size",
)  # fmt: skip


def _run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return run_profile(
        args.model,
        **{name: getattr(args, name) for name in _RUN_FLAGS},
        kv_cache_memory_mib=args.kv_cache_mib,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )


def main_profile(argv: list[str] | None = None) -> int:
    """Entry point of ``pdmesh profile``; returns the exit status (2 on bad flags or a bad model dir)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        if min(args.decode_steps, args.repeats) < 1 or args.warmup < 0 or args.max_batch_tokens < 1:
            raise _UsageError("--decode-steps and --repeats must be >= 1, --warmup >= 0")
        if not (args.model / "config.json").exists():
            raise _UsageError(f"{args.model} has no config.json (not a Hugging Face checkpoint directory)")
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except _UsageError as exc:
        print(f"pdmesh profile: error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.quick:
        args.prompt_lens, args.batch_sizes = [16, 64, 128], [1, 2]
        args.decode_batch_sizes, args.context_lens, args.decode_steps = [1, 4], [16, 64], 3
    try:
        profile = _run_from_args(args)
    except ValueError as exc:  # the engine refused the configuration or the checkpoint
        print(f"pdmesh profile: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except (RuntimeError, ImportError) as exc:
        print(f"pdmesh profile: failed: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    try:
        save_profile(profile, args.out)
    except OSError as exc:
        print(f"pdmesh profile: error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    fit = profile.get("fit", {})
    pre_err = fit.get("prefill", {}).get("fit_error", {}).get("mean_rel_error", float("nan"))
    dec_err = fit.get("decode", {}).get("fit_error", {}).get("mean_rel_error", float("nan"))
    print(
        f"wrote {args.out}: {len(profile['prefill'])} prefill and {len(profile['decode'])} decode points; "
        f"prefill fit {fit.get('prefill', {}).get('kind', '?')} mean rel. error {pre_err:.1%}, "
        f"decode fit mean rel. error {dec_err:.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main_profile())
