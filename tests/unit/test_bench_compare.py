"""pdmesh bench compare without servers: CPU assignment, ratios, the table, the planner check, the plot."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pdmesh.bench.compare import (
    RATIOS,
    Deployment,
    assign_cpus,
    build_parser,
    compute_ratios,
    deployments,
    format_comparison,
    main,
    parse_deployments,
    ratio,
)
from pdmesh.bench.compare_predict import compare_side, measured_lengths, rel_error, worker_limits
from pdmesh.launcher import StackSpec, parse_cpus
from pdmesh.planner.simulate import SimResult


def side(label: str, goodput: float | None, thr: float, ttft: float, tpot: float) -> dict:
    return {
        "request_goodput": goodput,
        "good_completed": None if goodput is None else 5,
        "request_throughput": thr,
        "output_throughput": thr * 10,
        "p99_ttft_ms": ttft,
        "p99_tpot_ms": tpot,
        "mean_ttft_ms": ttft / 2,
        "mean_tpot_ms": tpot / 2,
        "completed": 6,
        "failed": 0,
        "duration_s": 3.0,
        "deployment": {"label": label, "worker_cpus": ["0", "1"], "mode": "pd"},
        "per_request": {
            "input_lens": [16, 16],
            "output_lens": [4, 4],
            "ttft_ms": [1.0],
            "tpot_ms": [None, 2.0],
        },
    }


def report(pd: dict, col: dict) -> dict:
    workload = {
        "dataset": "random",
        "input_len": 16,
        "output_len": 4,
        "num_prompts": 6,
        "request_rate": 2.0,
        "goodput": {"ttft": 500.0, "tpot": 40.0},
    }
    return {"workload": workload, "pd": pd, "colocated": col, "ratios": compute_ratios(pd, col)}


def test_assign_cpus_gives_each_worker_its_own_block():
    assert assign_cpus(2, 1, [1, 0]) == ["0", "1"]
    assert assign_cpus(2, 2, [0, 1, 2, 3, 7]) == ["0,1", "2,3"]
    assert assign_cpus(3, 0, [0]) is None
    with pytest.raises(ValueError, match="need 4 CPUs"):
        assign_cpus(2, 2, [0, 1])
    with pytest.raises(ValueError):
        assign_cpus(2, -1, [0, 1])


def test_deployments_share_the_same_cpus():
    pd, col = deployments(1, 1, 1, [0, 1])
    assert (pd.mode, col.mode) == ("pd", "mixed")
    assert pd.worker_cpus == col.worker_cpus == ["0", "1"]
    assert pd.label() == "PD 1P+1D" and col.label() == "colocated 2x mixed"


def test_ratio_handles_missing_and_zero():
    assert ratio(3.0, 2.0) == pytest.approx(1.5)
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None and ratio(1.0, None) is None
    assert ratio(float("nan"), 1.0) is None


def test_compute_ratios_and_table():
    pd, col = side("PD 1P+1D", 1.3, 2.0, 100.0, 20.0), side("colocated 2x mixed", 1.0, 2.0, 50.0, 40.0)
    rep = report(pd, col)
    ratios = rep["ratios"]
    assert set(ratios) == {name for name, *_ in RATIOS}
    assert ratios["goodput"] == pytest.approx(1.3)
    assert ratios["request_throughput"] == pytest.approx(1.0)
    assert ratios["p99_ttft"] == pytest.approx(2.0) and ratios["p99_tpot"] == pytest.approx(0.5)
    table = format_comparison(rep)
    goodput_row = next(line for line in table.splitlines() if line.startswith("Goodput"))
    assert "1.30" in goodput_row and goodput_row.endswith("PD")
    ttft_row = next(line for line in table.splitlines() if line.startswith("P99 TTFT"))
    assert ttft_row.endswith("col")  # a higher latency ratio favours colocated
    assert "ttft<=500ms tpot<=40ms" in table and "5 met the SLO" in table


def test_table_without_goodput_slo():
    pd, col = side("PD", None, 2.0, 1.0, 1.0), side("col", None, 0.0, 1.0, 1.0)
    rep = report(pd, col)
    assert rep["ratios"]["goodput"] is None and rep["ratios"]["request_throughput"] is None
    assert "Goodput at the SLO (req/s)" in format_comparison(rep)


def test_prediction_rows_and_errors():
    assert rel_error(1.2, 1.0) == pytest.approx(0.2) and rel_error(1.0, 0.0) is None
    sim = SimResult("pd", 1, 1, 2.0, 1.5, 0.75, 0.8, 0.9, 2.0, True, {"p99": 1.0}, {"p99": 2.0})
    row = compare_side(sim, side("PD", 1.0, 2.0, 10.0, 5.0))
    assert row["goodput_rel_error"] == pytest.approx(0.5)
    assert row["measured_attainment"] == pytest.approx(5 / 6)
    rep = report(side("PD", 1.0, 2.0, 1.0, 1.0), side("col", 1.0, 2.0, 1.0, 1.0))
    rep["prediction"] = {"pd": row, "colocated": row}
    assert "rel. error 50.0%" in format_comparison(rep)


def test_measured_lengths_and_limits():
    inp, out = measured_lengths({"per_request": {"input_lens": [8, 9], "output_lens": [3, 3]}}, 1, 1)
    assert inp.values == (8, 9) and out.values == (3, 3)
    inp, out = measured_lengths({"per_request": {"input_lens": [], "output_lens": []}}, 64, 4)
    assert inp.values == (64,) and out.values == (4,)
    limits = worker_limits({"max-batch-size": "8"}, kv_us_per_token=2.0)
    assert limits.max_decode_batch_size == 8 and limits.max_prefill_tokens == 4096
    assert limits.kv_transfer_s_per_token == pytest.approx(2e-6)


def test_parser_defaults_and_worker_args(capsys):
    args = build_parser().parse_args(["--worker-arg", "kv-cache-memory-mib=32", "--goodput", "ttft:9"])
    assert args.worker_arg == [("kv-cache-memory-mib", "32")] and args.goodput == ["ttft:9"]
    assert (args.prefill, args.decode, args.cores_per_worker) == (1, 1, 1)
    defaults = build_parser().parse_args([])
    assert defaults.worker_arg == [] and defaults.goodput == ["ttft:1000", "tpot:50"]
    # bad usage: a one-line message naming the problem and a non-zero exit, before any stack starts
    with pytest.raises(SystemExit) as exited:
        main(["--worker-arg", "kv-cache-memory-mib"])
    assert exited.value.code == 2
    assert "expected KEY=VALUE, got 'kv-cache-memory-mib'" in capsys.readouterr().err
    assert main(["--prefill", "0"]) == 2
    assert capsys.readouterr().err.strip() == "pdmesh bench compare: --prefill and --decode must be >= 1"
    assert main(["--goodput", "ttft:soon"]) == 2
    assert "'soon' is not a number of milliseconds" in capsys.readouterr().err


def test_plot_is_small_png(tmp_path: Path):
    from pdmesh.bench.compare_plot import write_plot

    rep = report(side("PD", 1.0, 2.0, 1.0, 1.0), side("col", 0.5, 2.0, 1.0, 1.0))
    path = write_plot(rep, tmp_path / "cmp.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


def test_launcher_cpu_lists():
    assert parse_cpus("0") == {0} and parse_cpus("0-2,5") == {0, 1, 2, 5}
    for bad in ("", "a", "1-x", "-1"):
        with pytest.raises(ValueError):
            parse_cpus(bad)
    StackSpec(model_dir=Path("."), worker_cpus=["0", "1"])
    with pytest.raises(ValueError, match="one CPU list per worker"):
        StackSpec(model_dir=Path("."), worker_cpus=["0"])
    assert StackSpec(model_dir=Path(".")).worker_cpus is None


def test_deployment_dict():
    dep = Deployment("pd", "pd", 1, 2, None)
    assert dep.to_dict() == {"mode": "pd", "label": "PD 1P+2D", "worker_cpus": None}


def test_deployments_flag():
    assert parse_deployments("pd,mixed") == ["pd", "colocated"] == parse_deployments("mixed, pd")
    assert parse_deployments("pd") == ["pd"] and parse_deployments("mixed") == ["colocated"]
    for bad in ("", "pd,vllm", ","):
        with pytest.raises(ValueError, match="--deployments takes pd and/or mixed"):
            parse_deployments(bad)


def test_bad_peer_flags_are_one_line_errors(capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    cases = [
        (["--peer-url", url], f"--peer-url {url}: cannot reach it (ConnectError"),
        (["--peer-url", "localhost:8000"], "--peer-url must be an http:// or https:// URL"),
        (["--model-name", "m"], "--peer-name, --model-name and --peer-api-key need --peer-url"),
        (["--deployments", "pd", "--predict", "p.json"], "--predict needs both deployments"),
        (["--deployments", "vllm"], "--deployments takes pd and/or mixed"),
    ]
    for argv, message in cases:
        assert main([*argv, "--model", str(Path(__file__).parent), "--log-dir", "/nonexistent/x"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_table_and_plot_with_a_peer(tmp_path: Path):
    from pdmesh.bench.compare_plot import write_plot

    pd, peer = side("PD 1P+1D", 2.0, 2.0, 100.0, 20.0), side("vllm", 1.0, 2.0, 50.0, 40.0)
    peer["deployment"] = {"mode": "peer", "label": "vllm", "url": "http://h:8000", "worker_cpus": None}
    rep = report(pd, side("colocated 2x mixed", 1.0, 1.0, 1.0, 1.0))
    rep.update(peers={"vllm": peer}, peer_ratios={"vllm": {"pd": compute_ratios(pd, peer)}})
    table = format_comparison(rep)
    assert "PD vs colocated vs vllm (same host)" in table and "PD/vllm" in table
    goodput_row = next(line for line in table.splitlines() if line.startswith("Goodput"))
    assert goodput_row.endswith("2.00 PD")  # PD/colocated, then PD/vllm
    tpot_row = next(line for line in table.splitlines() if line.startswith("P99 TPOT"))
    assert tpot_row.endswith("0.50 PD")
    assert "vllm: 6 ok, 0 failed, 5 met the SLO, 3.0 s, at http://h:8000" in table
    data = write_plot(rep, tmp_path / "cmp.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
