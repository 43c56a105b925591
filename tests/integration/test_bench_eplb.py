"""``pdmesh bench eplb`` end to end: a real 2-rank instance (gloo) on a routing-skewed copy of a random
Qwen3-MoE; the balancer takes the ranks' imbalance from >= 1.5 to <= 1.15 and the tokens match."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.parallel_helpers import PROBE_TIMEOUT_S, ROOT

pytestmark = pytest.mark.timeout(PROBE_TIMEOUT_S + 60)


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pdmesh.cli", "bench", "eplb", *args],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        cwd=ROOT,
    )


def test_bench_eplb(model_factory) -> None:
    model = model_factory("qwen3_moe", "tiny")
    done = bench(
        "--model", str(model), "--moe-ep", "2", "--num-redundant-experts", "2",
        "--skew", "0.4", "--output-len", "4", "--repeats", "1", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["imbalance_before"] >= 1.5
    assert report["imbalance_after"] <= 1.15
    assert report["tokens_match"] is True
    assert set(report["cpu"]["flags"]) >= {"avx2", "avx512f", "amx_tile"}
    assert report["decode_step_ms_before"] > 0 and report["decode_step_ms_after"] > 0


def test_bench_eplb_bad_flags(model_factory) -> None:
    model = model_factory("qwen3_moe", "tiny")
    done = bench("--model", str(model), "--moe-ep", "1", "--json")
    assert done.returncode == 2 and "--moe-ep must be >= 2" in done.stderr
    done = bench("--model", str(model), "--moe-ep", "2", "--num-redundant-experts", "1", "--json")
    assert done.returncode == 2 and "do not divide over moe_ep=2" in done.stderr
