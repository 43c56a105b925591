"""Runs prompts through a real parallel instance and prints what it computed, as one JSON object.

``python -m tests.integration.parallel_probe SPEC_JSON``: this process is rank 0 (the leader, exactly
as a worker builds it with ``open_engine``) and starts the other ranks as real processes that join
over gloo. SPEC: ``{"model": dir, "prompts": [[ids]], "new_tokens": n, "worker": {WorkerConfig
fields: tp, dp, moe_ep, moe_tp, moe_dispatch, ...}, "idle_replica": bool, "rebalance": bool}``. Output: every prompt's
float32 prefill logits (all positions, full vocabulary), its greedy tokens alone, then all prompts
batched (with their prompt logprobs), and the free/total blocks at the end. With ``rebalance``
the leader rebalances the experts online (EPLB) and runs the prompts again. The fidelity tests compare these with transformers.
"""

from __future__ import annotations

import json
import sys

from pdmesh.config import WorkerConfig
from pdmesh.engine.step import StepInputs
from pdmesh.engine.types import EngineRequest
from pdmesh.generation import SamplingParams
from pdmesh.parallel.eplb_runtime import expert_stats, moe_layers
from pdmesh.parallel.instance import plan_instance
from pdmesh.parallel.rank_engine import open_engine


def prefill_logits(engine, ids: list[int]) -> list[list[float]]:
    """Logits of every position of ``ids`` prefilled alone into blocks of the replica they land in."""
    blocks = engine.allocate_kv(len(ids))
    replica, local = engine.replica_of(blocks)
    n = len(ids)
    step = StepInputs(True, ids, list(range(n)), [local], [n], [n], [-1], list(range(n)))
    plans = [None] * len(engine.replicas)
    plans[replica] = step
    try:
        return engine.executor.run_step(plans)[replica].tolist()
    finally:
        engine.free_kv(blocks)


def generate(
    engine, prompts: list[list[int]], new_tokens: int, prefix: str, prompt_lps: dict | None = None
) -> list[list[int]]:
    """Greedy tokens of each prompt; with ``prompt_lps`` (a dict to fill) also every prompt's prompt
    logprobs (the prompt tokens' own, the first None)."""
    sampling = SamplingParams(
        temperature=0,
        max_tokens=new_tokens,
        ignore_eos=True,
        prompt_logprobs=None if prompt_lps is None else 1,
    )
    for i, ids in enumerate(prompts):
        engine.add_request(EngineRequest(f"{prefix}{i}", ids, sampling))
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
            if o.prompt_logprobs is not None and prompt_lps is not None:
                prompt_lps[o.request_id] = [None if e is None else e[0] for e in o.prompt_logprobs]
    return [out[f"{prefix}{i}"] for i in range(len(prompts))]


def _placements(engine) -> list[list[list[int]]]:
    return [layer.placement.to_lists() for layer in moe_layers(engine.executor.runner.model)]


def main(spec: dict) -> dict:
    config = WorkerConfig(
        controller="127.0.0.1:1",  # never dialled: no worker service runs here
        redis_url="redis://127.0.0.1:1",
        model_dir=spec["model"],
        block_size=8,
        kv_cache_memory_mib=4,
        **spec["worker"],
    )
    engine, leader = open_engine(config, plan_instance(config))
    try:
        prompts, n = spec["prompts"], spec["new_tokens"]
        report = {"logits": [prefill_logits(engine, ids) for ids in prompts]}
        report["alone"] = [generate(engine, [ids], n, "a")[0] for ids in prompts]
        prompt_lps: dict = {}  # prompt logprobs: computed on every rank's vocabulary slice, batched
        report["batched"] = generate(engine, prompts, n, "b", prompt_lps)
        report["prompt_logprobs"] = [prompt_lps.get(f"b{i}") for i in range(len(prompts))]
        if spec.get("rebalance"):  # EPLB: move the experts online, then the same prompts again
            report["placement_before"] = _placements(engine)
            report["eplb"] = engine.executor.rebalance()
            report["placement_after"] = _placements(engine)
            report["after_logits"] = [prefill_logits(engine, ids) for ids in prompts]
            report["after_batched"] = generate(engine, prompts, n, "c")
            report["expert_stats"] = expert_stats(engine.executor.runner.model)
        stats = engine.stats()
        report["blocks"] = [stats.free_blocks, stats.total_blocks]
        state = leader.state
        report["comm_calls"] = state.comm_calls
        report["dispatch"] = state.moe_dispatch
        report["groups"] = {"tp": state.layout.tp_groups, "dp": state.layout.dp_groups}
        return report
    finally:
        leader.stop()


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
