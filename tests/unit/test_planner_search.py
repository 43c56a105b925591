"""The planner's P:D search and the ``pdmesh plan`` CLI."""

from __future__ import annotations

import json

import pytest

from pdmesh.planner.plan import main_plan, plan
from pdmesh.planner.profile_file import save_profile
from pdmesh.planner.simulate import (
    SLO,
    LengthDist,
    Limits,
    Requests,
    Workload,
    simulate_pd,
)
from tests.unit.planner_cases import flat_model, linear_model, synthetic_profile

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------ planner


def test_planner_follows_the_workload():
    model = linear_model()
    slo = SLO(ttft_ms=800, tpot_ms=60)
    prompt_heavy = Workload(20, LengthDist.parse("uniform:512,1024"), LengthDist.parse("8"), 1000)
    decode_heavy = Workload(20, LengthDist.parse("64"), LengthDist.parse("uniform:256,512"), 1000)
    p = plan(model, prompt_heavy, slo, Limits(), budget=64)["recommendation"]
    d = plan(model, decode_heavy, slo, Limits(), budget=64)["recommendation"]
    assert p["mode"] == "pd" and p["n_prefill"] > p["n_decode"]
    assert d["mode"] == "pd" and d["n_decode"] > d["n_prefill"]
    assert p["meets_rate"] and d["meets_rate"]
    assert p["simulated"]["attainment"] >= 0.9 and d["simulated"]["attainment"] >= 0.9


def test_min_instances_is_the_smallest_meeting_the_rate():
    model = linear_model()
    workload = Workload(20, LengthDist.parse("uniform:512,1024"), LengthDist.parse("8"), 1000)
    result = plan(model, workload, SLO(800, 60), Limits(), budget=64, want_min_instances=True)
    smallest, rates = result["min_instances"], result["per_instance_max_rate"]
    assert smallest["meets_rate"]
    assert smallest["total"] <= result["recommendation"]["total"]
    if smallest["mode"] == "pd":
        assert (smallest["n_prefill"] - 1) * rates["prefill"] < 20 or (smallest["n_decode"] - 1) * rates[
            "decode"
        ] < 20


def _write_profile(tmp_path):
    path = tmp_path / "profile.json"
    save_profile(synthetic_profile(noise=0.02), path)
    return path


def test_plan_cli_sweeps_500_instances(tmp_path, capsys):
    profile, out = _write_profile(tmp_path), tmp_path / "plan.json"
    rc = main_plan(
        [
            "--profile",
            str(profile),
            "--rate",
            "50",
            "--input-len",
            "uniform:128,1024",
            "--output-len",
            "uniform:16,256",
        ]
        + ["--ttft-ms", "600", "--tpot-ms", "80", "--budget", "500", "--min-instances", "--json", str(out)]
    )
    assert rc == 0  # its speed is a benchmark matter; the test's timeout bounds it
    text = capsys.readouterr().out
    assert "recommended:" in text and "fewest instances meeting the rate" in text
    data = json.loads(out.read_text())
    rec = data["recommendation"]
    assert rec["total"] <= 500 and rec["meets_rate"]
    assert set(rec["simulated"]) >= {"goodput", "attainment", "ttft_ms", "tpot_ms", "throughput"}
    assert data["inputs"]["budget"] == 500 and "latency_model" in data
    # the plan's own JSON can be fed back as a profile (it carries the fitted model)
    assert (
        main_plan(
            [
                "--profile",
                str(out),
                "--rate",
                "5",
                "--input-len",
                "64",
                "--output-len",
                "8",
                "--ttft-ms",
                "600",
                "--tpot-ms",
                "80",
                "--budget",
                "4",
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "change",
    [
        {"--profile": "missing.json"},
        {"--input-len": "uniform:5"},
        {"--rate": "abc"},
        {"--rate": "-1"},
        {"--attainment": "1.5"},
        {"--budget": "0"},
        {"--bogus": "1"},
    ],
)
def test_plan_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, change):
    args = {
        "--profile": str(_write_profile(tmp_path)),
        "--rate": "5",
        "--input-len": "64",
        "--output-len": "8",
        "--ttft-ms": "500",
        "--tpot-ms": "50",
        "--budget": "8",
    }
    args.update({k: (str(tmp_path / v) if k == "--profile" else v) for k, v in change.items()})
    argv = [x for kv in args.items() for x in kv]
    assert main_plan(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pdmesh plan: error:") and "\n" not in err


@pytest.mark.parametrize(("r_p", "r_d"), [(8.0, 78.0), (146.5, 5.4), (3.0, 3.0), (1.0, 0.0)])
def test_closed_form_splits_match_brute_force(r_p, r_d):
    from pdmesh.planner.search import best_split, best_unit

    budget = 60
    for n in range(2, budget + 1):
        assert best_split(n, r_p, r_d)[2] == pytest.approx(
            max(min(p * r_p, (n - p) * r_d) for p in range(1, n))
        )
    every = [(p, d, min(p * r_p, d * r_d)) for p in range(1, budget) for d in range(1, budget - p + 1)]
    top = max(r / (p + d) for p, d, r in every)
    p, d, rate = best_unit(r_p, r_d, budget)
    assert rate / (p + d) >= top * 0.98 - 1e-12
    assert p + d == min(p + d for p, d, r in every if r / (p + d) >= top * 0.98 - 1e-12)


def test_loose_slos_cannot_hide_an_unbounded_queue():
    from pdmesh.planner.search import max_decode_rate, max_prefill_rate

    model = flat_model(prefill_s=0.1, step_s=0.02)
    limits = Limits(max_prefill_batch_size=1, max_decode_batch_size=4)  # both phases: 10 req/s
    reqs = Requests.sample(Workload(1, LengthDist.parse("32"), LengthDist.parse("21"), 2000))
    loose = SLO(ttft_ms=1e7, tpot_ms=1e7)
    assert 9.0 < max_prefill_rate(model, reqs, loose, limits, 0.95, guess=1.0) <= 10.6
    assert 9.0 < max_decode_rate(model, reqs, loose, limits, 0.95, guess=1.0) <= 10.6
    heavy = simulate_pd(
        model, Workload(20, LengthDist.parse("32"), LengthDist.parse("21"), 2000), loose, limits, 1, 1
    )
    assert heavy.attainment == 1.0 and not heavy.stable
