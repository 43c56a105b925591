"""The planner: latency-model fits and the discrete-event simulator on known cases (the P:D search
and the CLI are in ``test_planner_search.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdmesh.planner.model import LatencyModel, PrefillModel
from pdmesh.planner.profile_file import load_profile, save_profile
from pdmesh.planner.simulate import (
    SLO,
    LengthDist,
    Limits,
    Requests,
    Workload,
    _steps_to_reach,
    run_decode,
    simulate_colocated,
    simulate_pd,
)
from tests.unit.planner_cases import DECODE, PREFILL, flat_model, linear_model, synthetic_profile

pytestmark = pytest.mark.timeout(60)

# ------------------------------------------------------------------------------------ latency model


def test_fit_recovers_known_coefficients():
    model = LatencyModel.fit(synthetic_profile())
    assert model.prefill.kind == "linear"
    assert model.prefill.coef == pytest.approx(list(PREFILL), rel=1e-6)
    assert (model.decode.alpha, model.decode.beta, model.decode.gamma) == pytest.approx(DECODE, rel=1e-6)
    assert model.prefill.fit_error["mean_rel_error"] < 1e-9
    assert model.decode.fit_error["mean_rel_error"] < 1e-9


def test_fit_with_noise_reports_small_error():
    model = LatencyModel.fit(synthetic_profile(noise=0.03))
    assert model.prefill.fit_error["mean_rel_error"] < 0.06
    assert model.decode.fit_error["mean_rel_error"] < 0.06
    assert model.prefill_latency(1024, 1024**2) == pytest.approx(0.01 + 0.1024 + 2e-8 * 1024**2, rel=0.1)


def test_piecewise_wins_when_the_curve_is_not_linear():
    points = [
        {"batch_tokens": t, "num_seqs": 1, "latency_s": 0.01 + 0.002 * np.sqrt(t)}
        for t in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    ]
    model = PrefillModel.fit(points)
    assert model.kind == "piecewise"
    assert model.fit_error["loo_rel_error_piecewise"] < model.fit_error["loo_rel_error_linear"]
    assert model.latency(300) == pytest.approx(0.01 + 0.002 * np.sqrt(300), rel=0.05)


def test_latency_model_round_trips():
    model = LatencyModel.fit(synthetic_profile(noise=0.02))
    again = LatencyModel.from_dict(json.loads(json.dumps(model.to_dict())))
    for tokens in (10, 500, 9000):
        assert again.prefill_latency(tokens, tokens**2) == model.prefill_latency(tokens, tokens**2)
    assert again.decode_step_latency(7, 300) == model.decode_step_latency(7, 300)


def test_profile_json_round_trip(tmp_path):
    profile = synthetic_profile()
    save_profile(profile, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == profile
    (tmp_path / "bad.json").write_text(json.dumps({"prefill": [], "decode": []}))
    with pytest.raises(ValueError, match="at least 2 prefill points"):
        load_profile(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_profile(tmp_path / "junk.json")


# ------------------------------------------------------------------------------------ simulator


@pytest.mark.parametrize(
    ("spec", "kind", "values"),
    [
        ("128", "fixed", (128,)),
        ("fixed:7", "fixed", (7,)),
        ("uniform:32,512", "uniform", (32, 512)),
        ("empirical:1,2,3", "empirical", (1, 2, 3)),
    ],
)
def test_length_specs(spec, kind, values):
    dist = LengthDist.parse(spec)
    assert (dist.kind, dist.values) == (kind, values)
    sample = dist.sample(np.random.default_rng(0), 500)
    assert sample.min() >= min(values) and sample.max() <= max(values)


def test_length_spec_from_file_and_errors(tmp_path):
    (tmp_path / "lens.json").write_text("[10, 20, 30]")
    assert LengthDist.parse(f"@{tmp_path / 'lens.json'}").values == (10, 20, 30)
    for bad in ("uniform:5", "uniform:9,3", "0", "gauss:1", "abc", f"@{tmp_path / 'missing'}"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_tiny_rate_gives_bare_service_times():
    model = flat_model(prefill_s=0.05, step_s=0.02)
    workload = Workload(1e-4, LengthDist.parse("100"), LengthDist.parse("11"), num_requests=200)
    slo = SLO(ttft_ms=51, tpot_ms=21)
    for result in (
        simulate_pd(model, workload, slo, Limits(), 1, 1),
        simulate_colocated(model, workload, slo, Limits(), 1),
    ):
        assert result.ttft_ms["mean"] == pytest.approx(50.0, rel=1e-6)
        assert result.ttft_ms["p99"] == pytest.approx(50.0, rel=1e-6)
        assert result.tpot_ms["p90"] == pytest.approx(20.0, rel=1e-6)
        assert result.tpot_ms["mean"] == pytest.approx(
            20.0, rel=1e-3
        )  # a rare overlap waits for a step boundary
        assert result.attainment == 1.0
        assert result.goodput == pytest.approx(1e-4)


def test_kv_transfer_adds_to_ttft():
    model = flat_model(prefill_s=0.05)
    workload = Workload(0.01, LengthDist.parse("100"), LengthDist.parse("4"), num_requests=100)
    result = simulate_pd(model, workload, SLO(1000, 1000), Limits(kv_transfer_s_per_token=1e-4), 1, 1)
    assert result.ttft_ms["mean"] == pytest.approx(60.0, rel=1e-6)


def test_overloaded_prefill_explodes_ttft_and_caps_goodput():
    model = flat_model(prefill_s=0.1)  # batch of one prompt each: capacity 10 req/s
    limits = Limits(max_prefill_batch_size=1)
    slo = SLO(ttft_ms=500, tpot_ms=100)
    capacity = 10.0
    light = simulate_pd(
        model, Workload(5, LengthDist.parse("64"), LengthDist.parse("8"), 2000), slo, limits, 1, 1
    )
    heavy = simulate_pd(
        model, Workload(30, LengthDist.parse("64"), LengthDist.parse("8"), 2000), slo, limits, 1, 1
    )
    assert light.ttft_ms["p90"] < 500
    assert heavy.ttft_ms["mean"] > 20 * light.ttft_ms["mean"]
    assert heavy.ttft_ms["p99"] > 50_000  # the queue grows without bound over the run
    assert heavy.goodput <= capacity * 1.05
    assert heavy.throughput == pytest.approx(capacity, rel=0.1)


def test_overloaded_decode_explodes_tpot():
    model = flat_model(prefill_s=0.001, step_s=0.02)  # batch cap 4, 20 decode steps: capacity 10 req/s
    limits = Limits(max_decode_batch_size=4)
    slo = SLO(1000, 30)
    ok = simulate_pd(
        model, Workload(4, LengthDist.parse("32"), LengthDist.parse("21"), 1000), slo, limits, 1, 1
    )
    bad = simulate_pd(
        model, Workload(20, LengthDist.parse("32"), LengthDist.parse("21"), 1000), slo, limits, 1, 1
    )
    assert ok.tpot_attainment > 0.8
    assert bad.tpot_ms["p90"] > 10 * ok.tpot_ms["p90"]
    assert bad.throughput == pytest.approx(10.0, rel=0.1)


def test_more_prefill_instances_raise_goodput_when_prefill_bound():
    model = linear_model()
    workload = Workload(20, LengthDist.parse("uniform:512,1024"), LengthDist.parse("16"), 2000)
    slo = SLO(ttft_ms=1000, tpot_ms=100)  # one prefill instance sustains about 11 req/s of these prompts
    goodputs = [simulate_pd(model, workload, slo, Limits(), n_p, 2).goodput for n_p in (1, 2, 3)]
    assert goodputs[0] < goodputs[1] < goodputs[2]
    assert goodputs[2] > 0.95 * 20


def test_colocated_prefills_stall_decodes():
    model = linear_model()
    workload = Workload(6, LengthDist.parse("uniform:512,1024"), LengthDist.parse("64"), 1000)
    slo = SLO(ttft_ms=2000, tpot_ms=60)
    pd = simulate_pd(model, workload, slo, Limits(), 1, 1)
    colocated = simulate_colocated(model, workload, slo, Limits(), 2)
    assert colocated.tpot_ms["p90"] > 1.5 * pd.tpot_ms["p90"]


def _naive_decode(model, arrivals, inp, out, max_batch):
    """Step-by-step reference for the event-jumping decode simulation."""
    n = len(arrivals)
    tpot, t, i, waiting, running, done = np.zeros(n), 0.0, 0, [], {}, 0
    while done < n:
        while i < n and arrivals[i] <= t:
            waiting.append(i)
            i += 1
        while waiting and len(running) < max_batch:
            j = waiting.pop(0)
            running[j] = [int(inp[j]) + 1, int(out[j]) - 1]
        if not running:
            t = arrivals[i]
            continue
        t += model.decode_step_latency(len(running), sum(c for c, _ in running.values()) / len(running))
        for j in list(running):
            running[j][0] += 1
            running[j][1] -= 1
            if running[j][1] == 0:
                tpot[j] = (t - arrivals[j]) / (out[j] - 1)
                del running[j]
                done += 1
    return tpot


def test_event_jumping_decode_matches_step_by_step():
    model = linear_model()
    reqs = Requests.sample(
        Workload(1, LengthDist.parse("uniform:16,256"), LengthDist.parse("uniform:2,40"), 300, seed=3)
    )
    for rate, cap in ((5.0, 8), (40.0, 8), (40.0, 64)):
        arrivals = reqs.arrivals(rate, "decode")
        fast, _ = run_decode(
            model, arrivals, reqs.input_len, reqs.output_len, Limits(max_decode_batch_size=cap)
        )
        slow = _naive_decode(model, arrivals, reqs.input_len, reqs.output_len, cap)
        np.testing.assert_allclose(fast, slow, rtol=1e-9)


@pytest.mark.parametrize("d0,g", [(0.02, 0.0), (0.02, 1e-4), (1e-3, 5e-3)])
def test_steps_to_reach(d0, g):
    for delta in (1e-9, 0.019, 0.02, 0.5, 7.3):
        m = _steps_to_reach(delta, d0, g)
        cost = lambda k: k * d0 + g * k * (k - 1) / 2  # noqa: E731
        assert cost(m) >= delta and (m == 1 or cost(m - 1) < delta)
