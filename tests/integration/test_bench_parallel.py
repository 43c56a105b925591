"""``pdmesh bench engine`` on a parallel instance: it runs the ranks as a worker does and reports the
layout, the dispatch path and the share of the run spent in collectives (a subprocess: the process
groups must not outlive the command)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.parallel_helpers import ROOT

pytestmark = pytest.mark.timeout(240)


def bench(*flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pdmesh.cli", "bench", "engine", *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=200, cwd=ROOT)


def test_reports_comm_fraction_for_the_chosen_dispatch(model_factory) -> None:
    model = model_factory("qwen3_moe", "tiny")
    done = bench(
        "--model", str(model), "--batch-size", "2", "--input-len", "8", "--output-len", "4",
        "--dp", "2", "--moe-ep", "2", "--moe-dispatch", "all_to_all", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert (report["world"], report["dp"], report["moe_ep"], report["moe_dispatch"]) == (
        2,
        2,
        2,
        "all_to_all",
    )
    assert 0 < report["comm_fraction"] < 1
    assert report["engine_output_tokens_per_s"] > 0


def test_an_impossible_layout_is_one_line_and_status_2(model_factory) -> None:
    done = bench(
        "--model", str(model_factory("qwen3_moe", "tiny")), "--batch-size", "1", "--input-len", "4",
        "--output-len", "2", "--dp", "2", "--moe-dispatch", "all_reduce",
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "pdmesh bench engine: error: moe_dispatch all_reduce needs every rank to see every token (dp 1), not dp=2"
    ]
