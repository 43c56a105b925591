"""`pdmesh profile` against the real engine on a tiny random checkpoint, then `pdmesh plan` on its output."""

from __future__ import annotations

import json

import pytest

from pdmesh.planner.plan import main_plan
from pdmesh.planner.profile import main_profile
from pdmesh.planner.profile_file import load_profile

pytestmark = pytest.mark.timeout(180)


def test_quick_profile_writes_valid_monotone_json(tiny_qwen3, tmp_path, capsys):
    import torch

    out = tmp_path / "profile.json"
    threads = torch.get_num_threads()
    try:  # one thread: a busy 2-core machine distorts multi-threaded timings far more
        rc = main_profile(
            [
                "--model",
                str(tiny_qwen3),
                "--out",
                str(out),
                "--prompt-lens",
                "16,64,256",
                "--batch-sizes",
                "1,4",
            ]
            + ["--decode-batch-sizes", "1,8", "--context-lens", "16,128", "--decode-steps", "4"]
            + ["--repeats", "3", "--threads", "1"]
        )
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, capsys.readouterr().err
    profile = load_profile(out)
    assert json.loads(out.read_text()) == profile
    meta = profile["metadata"]
    assert meta["device"] == "cpu" and meta["dtype"] == "float32" and meta["torch_threads"] == 1
    assert profile["cpu"]["cores"] and set(profile["cpu"]["flags"]) >= {"avx2", "avx512f", "amx_tile"}
    assert meta["model_dir"] and meta["date"]
    assert len(profile["prefill"]) == 6 and len(profile["decode"]) == 4
    assert all(p["latency_s"] > 0 for p in profile["prefill"])
    assert all(p["step_latency_s"] > 0 for p in profile["decode"])

    by_tokens = sorted(profile["prefill"], key=lambda p: p["batch_tokens"])
    assert by_tokens[-1]["latency_s"] > by_tokens[0]["latency_s"]  # 1024 tokens cost more than 16
    for n in (1, 4):
        row = sorted((p for p in profile["prefill"] if p["num_seqs"] == n), key=lambda p: p["prompt_len"])
        assert row[-1]["latency_s"] > 0.8 * row[0]["latency_s"]
    decode = {(p["batch_size"], p["prompt_len"]): p["step_latency_s"] for p in profile["decode"]}
    assert decode[(8, 128)] > 0.7 * decode[(1, 16)]
    assert "fit" in profile

    plan_json = tmp_path / "plan.json"
    rc = main_plan(
        ["--profile", str(out), "--rate", "2", "--input-len", "uniform:16,256", "--output-len", "16"]
        + ["--ttft-ms", "2000", "--tpot-ms", "500", "--budget", "16", "--json", str(plan_json)]
    )
    assert rc == 0
    assert json.loads(plan_json.read_text())["recommendation"]["total"] <= 16
