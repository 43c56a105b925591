"""``pdmesh bench compare`` end to end: a PD stack and a colocated stack of tiny_qwen3, pinned to their
own cores, each serving the same six requests; the JSON holds both results and the ratios."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pdmesh.bench.compare import RATIOS, assign_cpus, main

pytestmark = pytest.mark.timeout(150)


def test_compare_pd_and_colocated(tiny_qwen3: Path, tmp_path: Path, capsys):
    available = sorted(os.sched_getaffinity(0))
    cores = 1 if len(available) >= 2 else 0  # one core each where there are two, else unpinned
    out_json = tmp_path / "compare.json"
    argv = [
        "--model", str(tiny_qwen3),
        "--num-prompts", "6",
        "--input-len", "16",
        "--output-len", "4",
        "--request-rate", "20",
        "--warmup", "1",
        "--goodput", "ttft:600000", "tpot:600000",
        "--cores-per-worker", str(cores),
        "--worker-arg", "kv-cache-memory-mib=16",
        "--timeout", "60",
        "--json", str(out_json),
        "--log-dir", str(tmp_path / "logs"),
        "--disable-tqdm",
    ]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "PD vs colocated" in table and "PD 1P+1D" in table and "colocated 2x mixed" in table
    data = json.loads(out_json.read_text())
    for name, mode in (("pd", "pd"), ("colocated", "mixed")):
        side = data[name]
        assert side["errors"] == [] and side["completed"] == 6, side["errors"]
        assert side["total_output_tokens"] == 24 and side["good_completed"] == 6
        assert side["deployment"]["mode"] == mode
        assert side["deployment"]["worker_cpus"] == assign_cpus(2, cores, available)
    assert set(data["ratios"]) == {name for name, *_ in RATIOS}
    assert data["ratios"]["goodput"] == pytest.approx(
        data["pd"]["request_goodput"] / data["colocated"]["request_goodput"]
    )
    assert data["ratios"]["p99_tpot"] > 0 and data["workload"]["num_prompts"] == 6
