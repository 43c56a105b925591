"""Drives an ``LLMEngine`` through the measurements of ``pdmesh profile``.

Prefill: a batch of prompts in PREFILL mode, timed from the first step until every prompt has its first
token, then its pinned KV blocks go back with ``free_kv``. Decode: a batch in MIXED mode with
``ignore_eos``; once every sequence has its first token, ``warmup`` steps are skipped and the next steps
that advance the whole batch are timed.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

MAX_STEPS_PER_POINT = 10_000


def model_summary(model_dir: Path) -> dict[str, Any]:
    cfg = json.loads((model_dir / "config.json").read_text())
    heads = int(cfg.get("num_attention_heads", 1))
    return {
        "architectures": cfg.get("architectures"),
        "vocab_size": int(cfg.get("vocab_size", 1000)),
        "num_hidden_layers": int(cfg.get("num_hidden_layers", 1)),
        "hidden_size": int(cfg.get("hidden_size", 0)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or int(cfg.get("hidden_size", heads)) // heads),
        "max_position_embeddings": int(cfg.get("max_position_embeddings") or 1 << 30),
    }


def kv_mib_needed(summary: dict[str, Any], tokens: int, dtype: str) -> int:
    """KV cache MiB for ``tokens`` tokens, with room for block rounding and the allocator's overhead."""
    width = 2 if dtype in ("bfloat16", "float16") else 4
    per_token = (
        2 * summary["num_hidden_layers"] * summary["num_key_value_heads"] * summary["head_dim"] * width
    )
    return int(tokens * per_token * 1.5 / 2**20) + 16


class EngineBench:
    """Drives one engine through prefill and decode measurements."""

    def __init__(self, engine: Any, vocab_size: int, seed: int = 0) -> None:
        self.engine, self.vocab, self.rng, self.counter = engine, vocab_size, random.Random(seed), 0

    def _prompt(self, length: int) -> list[int]:
        return [self.rng.randrange(3, self.vocab) for _ in range(length)]

    def _add(self, prompt_len: int, mode: Any, max_tokens: int) -> str:
        from pdmesh.engine.types import EngineRequest
        from pdmesh.generation import SamplingParams

        self.counter += 1
        rid = f"profile-{self.counter}"
        sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(EngineRequest(rid, self._prompt(prompt_len), sampling, mode=mode))
        return rid

    def _step(self) -> list[Any]:
        outputs = self.engine.step()
        for out in outputs:
            if out.error:
                raise RuntimeError(f"the engine failed {out.request_id}: {out.error}")
        return outputs

    def prefill(self, num_seqs: int, prompt_len: int) -> tuple[float, int]:
        """Seconds until every prompt of the batch has its first token, and the steps it took."""
        from pdmesh.generation import RequestMode

        pending = {self._add(prompt_len, RequestMode.PREFILL, 1) for _ in range(num_seqs)}
        steps, started = 0, time.perf_counter()
        blocks: list[list[int]] = []
        while pending and steps < MAX_STEPS_PER_POINT:
            for out in self._step():
                if out.finished and out.request_id in pending:
                    pending.discard(out.request_id)
                    blocks.append(out.kv_block_ids or [])
            steps += 1
        elapsed = time.perf_counter() - started
        for ids in blocks:
            if ids:
                self.engine.free_kv(ids)
        if pending:
            raise RuntimeError(f"prefill of {num_seqs}x{prompt_len} did not finish")
        return elapsed, steps

    def decode(self, batch: int, prompt_len: int, warmup: int, steps: int) -> list[float]:
        """Latencies of the decode steps (after ``warmup`` of them) that advanced the whole batch."""
        from pdmesh.generation import RequestMode

        ids = {self._add(prompt_len, RequestMode.MIXED, 1 + warmup + steps) for _ in range(batch)}
        started: set[str] = set()
        finished: set[str] = set()
        timings: list[float] = []
        decode_steps = 0
        for _ in range(MAX_STEPS_PER_POINT):
            if finished >= ids:
                break
            all_started = started >= ids
            t0 = time.perf_counter()
            outputs = self._step()
            elapsed = time.perf_counter() - t0
            advanced = {o.request_id for o in outputs if o.request_id in ids and o.token_ids}
            finished |= {o.request_id for o in outputs if o.finished}
            started |= advanced
            if all_started:
                decode_steps += 1
                if decode_steps > warmup and len(advanced) == batch:
                    timings.append(elapsed)
        return timings


def decode_statistic(runs: list[list[float]], stat: str) -> float | None:
    """One step latency from several runs of timed steps (step k of every run has the same context).

    ``min``: the mean over steps of each step's fastest run (so the context is the steps' mean);
    ``median``: the median of all steps.
    """
    runs = [r for r in runs if r]
    if not runs:
        return None
    if stat == "median":
        return statistics.median(t for r in runs for t in r)
    width = min(len(r) for r in runs)
    return statistics.fmean(min(r[k] for r in runs) for k in range(width))


def default_engine(options: dict[str, Any]) -> Any:
    from pdmesh.engine.config import EngineConfig
    from pdmesh.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(**options))
