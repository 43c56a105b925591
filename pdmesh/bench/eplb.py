"""``pdmesh bench eplb``: expert-parallel load balancing on a workload skewed toward a few experts.

The checkpoint is copied with its routing skewed: every embedding row gets a common direction ``u``
(so every token's hidden state leans along it) and the router rows of the hot experts (the first
``top_k`` that only ep rank 0 holds in the first placement) get ``--skew`` x their norm along ``u``, so
most tokens choose them. An instance of ``--moe-ep`` ranks (tp = moe_ep, dp 1: rank 0 counts every
token) with ``--num-redundant-experts`` spare slots generates for a batch of random prompts; then
it rebalances online (``pdmesh.parallel.eplb``: replicate the hottest experts, pack the replicas
onto the ranks) and generates for the same prompts again.

Reports the ep ranks' load imbalance (max / mean of the (token, expert) pairs each rank computes,
averaged over the MoE layers) of each run, the mean decode step time of each run, and whether the
tokens of the two runs matched. ``--repeats`` timed runs each side, medians. Prints one JSON object; bad flags give a one-line error and exit 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from pdmesh.bench.engine import _Parser, _positive, make_prompts, run_engine
from pdmesh.bench.host import host_info

ROUTER_SUFFIX = ".mlp.gate.weight"
LEAN = 1.0  # the common direction in every embedding row, relative to the rows' mean norm


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pdmesh bench eplb", description="EPLB: rank-load imbalance and step time, before/after."
    )
    p.add_argument(
        "--model", type=Path, required=True, help="a MoE checkpoint directory (Hugging Face layout)"
    )
    p.add_argument("--moe-ep", type=int, required=True, help="expert parallel ranks (>= 2)")
    p.add_argument("--num-redundant-experts", type=int, default=0, help="spare expert slots (replicas)")
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--input-len", type=_positive, default=32)
    p.add_argument("--output-len", type=_positive, default=16)
    p.add_argument("--repeats", type=_positive, default=3, help="timed runs each side (medians)")
    p.add_argument("--skew", type=float, default=0.2, help="how hard the hot experts pull (0: no skew)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON (the only format)")
    return p


def hot_experts(experts: int, top_k: int, moe_ep: int, redundant: int) -> list[int]:
    """Up to ``top_k`` experts that only ep rank 0 holds in the instance's first placement."""
    from pdmesh.parallel.eplb import ReplicaPlacement

    first = ReplicaPlacement.initial(experts, moe_ep, redundant)
    return [e for e in first.table[0] if len(first.physical_of(e)) == 1][:top_k]


def write_skewed(src: Path, dst: Path, moe_ep: int, redundant: int, skew: float) -> list[int]:
    """Copies ``src`` to ``dst`` with routing pulled toward a few experts; the hot experts."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    experts = config.get("num_experts") or config.get("n_routed_experts")
    top_k = config.get("num_experts_per_tok")
    if not experts or not top_k:
        raise ValueError(
            f"{src} is not a MoE checkpoint (no num_experts / num_experts_per_tok in config.json)"
        )
    hot = hot_experts(experts, top_k, moe_ep, redundant)
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy(item, dst / item.name)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(config["hidden_size"], generator=gen)
    u /= u.norm()
    routers = 0
    for shard in sorted(src.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.endswith("embed_tokens.weight"):
                t += (LEAN * t.float().norm(dim=1).mean() * u).to(t.dtype)
            elif name.endswith(ROUTER_SUFFIX) and t.shape[0] == experts:
                t[hot] += (skew * t.float().norm(dim=1).mean() * u).to(t.dtype)
                routers += 1
        save_file(tensors, dst / shard.name, metadata={"format": "pt"})
    if not routers:
        raise ValueError(f"{src} has no router weights named *{ROUTER_SUFFIX}")
    return hot


def leader_imbalance(model: Any) -> float:
    """The ep ranks' imbalance over the leader's window, averaged over the MoE layers (dp 1: the
    leader counts every token)."""
    from pdmesh.parallel.eplb import imbalance
    from pdmesh.parallel.eplb_runtime import moe_layers, window_loads

    loads = window_loads(model)
    values = [imbalance(layer.placement, ls) for layer, ls in zip(moe_layers(model), loads, strict=True)]
    return sum(values) / len(values) if values else 1.0


def _median_ms(runs: list[dict]) -> float:
    return round(statistics.median(r["decode_step_s"] for r in runs) * 1e3, 3)


def benchmark(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    from pdmesh.config import WorkerConfig
    from pdmesh.parallel.eplb_runtime import clear_window
    from pdmesh.parallel.instance import plan_instance
    from pdmesh.parallel.rank_engine import open_engine

    b = args.batch_size
    config = WorkerConfig(
        controller="127.0.0.1:1",  # never dialled: only the engine runs
        redis_url="redis://127.0.0.1:1",
        model_dir=str(model_dir),
        max_batch_size=b,
        max_prefill_batch_size=b,
        max_prefill_tokens=b * args.input_len,
        tp=args.moe_ep,
        moe_ep=args.moe_ep,
        moe_tp=1,
        num_redundant_experts=args.num_redundant_experts,
        eplb_window_steps=100000,  # the whole run
    )
    engine, leader = open_engine(config, plan_instance(config))
    try:
        model = leader.executor.runner.model
        prompts = make_prompts(b, args.input_len, engine.model_config.vocab_size, args.seed)
        run_engine(engine, prompts, 2)  # warm up
        clear_window(model)
        before = [run_engine(engine, prompts, args.output_len) for _ in range(args.repeats)]
        imbalance_before = leader_imbalance(model)
        moved = leader.executor.rebalance()
        clear_window(model)
        after = [run_engine(engine, prompts, args.output_len) for _ in range(args.repeats)]
        imbalance_after = leader_imbalance(model)
    finally:
        leader.stop()
    return {
        "moe_ep": args.moe_ep,
        "num_redundant_experts": args.num_redundant_experts,
        "batch_size": b,
        "imbalance_before": round(imbalance_before, 4),
        "imbalance_after": round(imbalance_after, 4),
        "predicted_after": round(moved["imbalance_after"], 4),
        "decode_step_ms_before": _median_ms(before),
        "decode_step_ms_after": _median_ms(after),
        "tokens_match": all(run["tokens"] == before[0]["tokens"] for run in before + after),
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and prints its JSON; 2 on bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.moe_ep < 2:
        parser.error(f"--moe-ep must be >= 2 to balance experts over ranks, got {args.moe_ep}")
    if args.num_redundant_experts < 0:
        parser.error(f"--num-redundant-experts must be >= 0, got {args.num_redundant_experts}")
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} has no config.json")
    try:
        with tempfile.TemporaryDirectory(prefix="pdmesh-eplb-") as tmp:
            hot = write_skewed(args.model, Path(tmp), args.moe_ep, args.num_redundant_experts, args.skew)
            report = {"hot_experts": hot, **benchmark(args, Path(tmp)), **host_info()}
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
